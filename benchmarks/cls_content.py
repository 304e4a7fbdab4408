"""What do a model's two CLS tokens hold about a scene? Linear probes on the floor and on the main object.

For each model file: the global CLS (CLS1), the spatial CLS (CLS2) and the mean patch token of the quick
evaluation's 512 training / 256 test scenes (112 px, scenes seed 1234), standardised with the training
statistics; a linear classifier (Adam, 300 full-batch steps, L2 1e-3) per target, test accuracy printed for:
the floor's colour (7 kinds), the floor's texture (4) and the scene label (the shape of the largest object, 8).
The floor words are read from the scene's detailed caption.

    PYTHONPATH=src python benchmarks/cls_content.py MODEL.safetensors [MODEL ...]
"""

from __future__ import annotations

import argparse
import re

import torch
import torch.nn.functional as F

from tipstorch.data.sample import ImageTextSample
from tipstorch.data.scene_splits import SceneSplits
from tipstorch.data.scenes import FLOOR_COLOURS, FLOOR_TEXTURES, SHAPES
from tipstorch.data.transforms import image_transform
from tipstorch.eval.quick import QUICK_SETTINGS
from tipstorch.weights.factory import load_model

FLOOR_NAMES = [name for name, _ in FLOOR_COLOURS]
_FLOOR = re.compile(rf"a (\w+) ({'|'.join(FLOOR_NAMES)}) floor(?! with)|a ({'|'.join(FLOOR_NAMES)}) floor with stripes")
TARGETS = (("floor colour", len(FLOOR_COLOURS)), ("floor texture", len(FLOOR_TEXTURES)), ("scene label", len(SHAPES)))


def scene_targets(sample: ImageTextSample) -> tuple[int, int, int]:
    """(floor colour index, floor texture index, scene label) of a rendered scene."""
    found = _FLOOR.search(sample.captions["detailed"])
    if found is None:
        raise ValueError(f"scene {sample.key}: no floor phrase in its detailed caption {sample.captions['detailed']!r}")
    if found.group(3):
        return FLOOR_NAMES.index(found.group(3)), FLOOR_TEXTURES.index("striped"), sample.label
    return FLOOR_NAMES.index(found.group(2)), FLOOR_TEXTURES.index(found.group(1)), sample.label


def probe_accuracy(train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor, test_labels: torch.Tensor,
                   num_classes: int) -> float:
    """Test accuracy of a linear classifier on standardised features [N, D]."""
    mean, std = train.mean(0), train.std(0) + 1e-6
    train, test = (train - mean) / std, (test - mean) / std
    weight = torch.zeros(train.shape[1], num_classes, requires_grad=True)
    bias = torch.zeros(num_classes, requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=1e-2)
    for _ in range(300):
        loss = F.cross_entropy(train @ weight + bias, train_labels) + 1e-3 * weight.square().sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return ((test @ weight + bias).argmax(dim=1) == test_labels).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", help="model files (tipstorch.load_model)")
    args = parser.parse_args()
    torch.manual_seed(0)
    settings = QUICK_SETTINGS
    splits = SceneSplits(settings.image_size, settings.scenes_seed, settings.scenes_train, settings.scenes_test)
    transform = image_transform(settings.image_size)
    images = {split: torch.stack([transform(s.image) for s in samples]) for split, samples in splits.samples.items()}
    labels = {split: torch.tensor([scene_targets(s) for s in samples]) for split, samples in splits.samples.items()}
    readouts = {"CLS1": lambda f: f.global_cls, "CLS2": lambda f: f.spatial_cls,
                "patch mean": lambda f: f.patch_tokens.mean(dim=(1, 2))}
    print("| model | features | " + " | ".join(name for name, _ in TARGETS) + " |")
    print("|---|---|" + "---:|" * len(TARGETS))
    for path in args.models:
        model = load_model(path).eval()
        with torch.no_grad():
            outputs = {split: [model.encode_image(chunk) for chunk in batch.split(64)] for split, batch in images.items()}
        for name, readout in readouts.items():
            features = {split: torch.cat([readout(o) for o in outs]).float() for split, outs in outputs.items()}
            accuracies = [probe_accuracy(features["train"], labels["train"][:, i], features["test"], labels["test"][:, i], n)
                          for i, (_, n) in enumerate(TARGETS)]
            print(f"| {path} | {name} | " + " | ".join(f"{a:.2f}" for a in accuracies) + " |", flush=True)


if __name__ == "__main__":
    main()
