"""Quick evaluation on the built-in scenes data: every task type of the paper, scaled down for a CPU.

``quick_evaluation(model, tokenizer)`` renders two disjoint index ranges of a seeded
``ScenesDataset`` (train: ``[0, num_train)``, test: ``[num_train, num_train + num_test)``; the
default seed differs from the training default 0, so no test scene was seen in training), runs the
frozen model once over all of them, then scores:

| key prefix       | task (paper protocol it scales down)                       | on the scenes                                  |
|------------------|------------------------------------------------------------|------------------------------------------------|
| zeroshot_cls/    | zero-shot classification, global CLS, 80 CLIP templates    | scene label (``ScenesDataset.label_names``)    |
| zeroshot_seg/    | zero-shot segmentation, values readout, 9 TCL templates    | shape classes; background pixels ignored       |
| retrieval/       | image<->text recall@1/5/10, spatial CLS                    | the scenes' spatial captions, one per image    |
| retrieval_alt/   | the same with the global CLS                               | the scenes' alt-texts                          |
| knn/             | 20-NN soft vote on the global CLS                          | scene label                                    |
| linear/          | linear classifier on the global CLS, lr grid, best reported| scene label                                    |
| seg_probe/       | linear segmentation probe, patch tokens + spatial CLS      | 9 classes (background + 8 shapes), mIoU        |
| depth_probe/     | linear 256-bin depth probe, x4 upsampling                  | metric depth; bins over 0.001..12 m            |
| normals_dpt/     | DPT on 4 evenly spaced blocks, angular loss                | object normals (camera axes); floor ignored    |
| depth_dpt/       | DPT depth (256 bins); not in the default task list         | metric depth                                   |

Metric names and directions: ``tipstorch.eval.report``. Zero-shot segmentation follows the
ADE150 / VOC20 "without background" protocol: the floor is not a class, its pixels are ignored,
and the mIoU is over the eight shapes. The normals probe is trained and scored on object pixels
only: the floor has one constant normal that any model predicts (with it, a random model would
score ~9 deg mean error). Chance levels (what a random model should score, roughly):
zeroshot_cls/top1 ~ 1/8 (the labels are not uniform: the most frequent shape is ~ 1/4),
retrieval r1 ~ 1/num_test, zeroshot_seg/miou ~ 0.03-0.07. The probes learn from random features too
(colour, position), so their random-model numbers are a baseline to beat, not chance.

Differences from the paper's protocols, all for speed: one resolution for everything
(``image_size``), a few hundred images, probe schedules cut to ``probe_iterations`` with the
learning rates of ``QuickEvalConfig`` (the paper's are tuned for 40k-50k iterations), a DPT
with ``dpt_channels`` fusion channels instead of 256, features computed once without
augmentation, the zero-shot segmentation window = the whole image.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from torch import nn
from tqdm.auto import tqdm

from tipstorch.data.scenes import ScenesConfig, ScenesDataset
from tipstorch.data.transforms import pil_to_tensor
from tipstorch.eval.features import Tokenizer, embed_texts, extract_features
from tipstorch.eval.knn import knn_classification
from tipstorch.eval.probes import (
    DPT_RECIPE,
    LINEAR_DEPTH_RECIPE,
    LINEAR_SEGMENTATION_RECIPE,
    IntermediateFeatures,
    LinearClassifierConfig,
    PatchFeatures,
    ProbeOptimConfig,
    dpt_depth_probe,
    dpt_normals_probe,
    linear_depth_probe,
    linear_segmentation_probe,
    train_linear_classifier,
)
from tipstorch.eval.report import format_comparison, headline
from tipstorch.eval.retrieval import retrieval_recall
from tipstorch.eval.templates import get_templates
from tipstorch.eval.zeroshot import (
    ZeroShotSegConfig,
    build_text_classifier,
    evaluate_zero_shot_segmentation,
    segmentation_classifier,
    values_readout,
    zero_shot_classification,
)
from tipstorch.models.dense import DepthBinsConfig, DPTConfig, dpt_layer_indices

__all__ = ["QUICK_TASKS", "ALL_QUICK_TASKS", "QuickEvalConfig", "format_comparison", "quick_evaluation"]

QUICK_TASKS: tuple[str, ...] = (
    "zeroshot_cls", "zeroshot_seg", "retrieval", "knn", "linear", "seg_probe", "depth_probe", "normals_dpt",
)  # fmt: skip
ALL_QUICK_TASKS: tuple[str, ...] = (*QUICK_TASKS, "depth_dpt")
DPT_TASKS = frozenset({"normals_dpt", "depth_dpt"})

# Scenes depth: the floor spans 5-7 m (bottom row) to 9-11 m (top row), objects stand in front of
# it (ScenesConfig defaults), so the paper's 256 bins are spread over 0.001..12 m instead of NYU's 10 m.
SCENES_DEPTH_BINS = DepthBinsConfig(num_bins=256, min_depth=1e-3, max_depth=12.0)


@dataclass(frozen=True)
class QuickEvalConfig:
    """Size of the quick evaluation. Defaults keep tips-tiny at ~1-2 min on 2 CPU cores.

    image_size: side of the square scenes (multiple of 14); 112 = the tiny_cpu training crops.
    num_train / num_test: scenes used to fit the probes / kNN bank, and to score every task.
    seed: scenes seed (not 0, the training default) and seed of every probe.
    probe_iterations, probe_batch_size: schedule of the three dense probes (paper: 40k-50k
        iterations, batch 16 / 8); warm-up shrinks proportionally.
    seg_probe_lr, depth_probe_lr, dpt_lr: AdamW learning rates for the short schedules (paper
        recipes: 1e-3, 1e-4, 1e-4 over 40k-50k iterations).
    linear_epochs, linear_batch_size: the linear classifier (paper: 10 epochs, batch 1024 on
        ImageNet); the DINOv2 learning-rate grid is kept.
    dpt_channels: DPT fusion channels (official: 256).
    tasks: subset of ``ALL_QUICK_TASKS`` (default ``QUICK_TASKS``).
    """

    image_size: int = 112
    num_train: int = 512
    num_test: int = 256
    seed: int = 1234
    probe_iterations: int = 300
    probe_batch_size: int = 8
    seg_probe_lr: float = 1e-2
    depth_probe_lr: float = 1e-2
    dpt_lr: float = 1e-3
    linear_epochs: int = 30
    linear_batch_size: int = 64
    dpt_channels: int = 64
    batch_size: int = 32
    tasks: tuple[str, ...] = QUICK_TASKS

    def __post_init__(self) -> None:
        object.__setattr__(self, "tasks", tuple(self.tasks))
        unknown = [task for task in self.tasks if task not in ALL_QUICK_TASKS]
        if unknown or not self.tasks:
            raise ValueError(f"QuickEvalConfig.tasks must be a non-empty subset of {ALL_QUICK_TASKS}, got {self.tasks}")
        if self.image_size <= 0 or self.image_size % 14:
            raise ValueError(f"QuickEvalConfig.image_size must be a positive multiple of 14, got {self.image_size}")
        if self.num_train < 2 or self.num_test < 2:
            raise ValueError(f"QuickEvalConfig needs num_train, num_test >= 2, got {self.num_train}, {self.num_test}")
        if self.probe_iterations < 1 or self.probe_batch_size < 1:
            raise ValueError("QuickEvalConfig.probe_iterations and probe_batch_size must be >= 1")

    def probe_recipe(self, paper_recipe: ProbeOptimConfig, learning_rate: float) -> ProbeOptimConfig:
        """The paper's recipe cut to ``probe_iterations``, with the quick learning rate and seed."""
        scaled = paper_recipe.scaled(self.probe_iterations, self.probe_batch_size)
        return replace(scaled, learning_rate=learning_rate, seed=self.seed)


@dataclass
class SceneSplit:
    """Rendered scenes with their targets and frozen features (N scenes, image side S, grid h = S / 14).

    labels long [N]; class_masks long [N, S, S] (0 = background); depth float [N, S, S] (m);
    normals float [N, 3, S, S]; global_cls / spatial_cls [N, D]; patch_tokens [N, h, h, D];
    intermediates: DPT inputs (only when a DPT task runs).
    """

    images: list
    labels: torch.Tensor
    class_masks: torch.Tensor
    depth: torch.Tensor
    normals: torch.Tensor
    spatial_captions: list[str]
    alt_captions: list[str]
    global_cls: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    spatial_cls: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    patch_tokens: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    intermediates: IntermediateFeatures | None = None

    @property
    def patch_features(self) -> PatchFeatures:
        return PatchFeatures(self.patch_tokens, self.spatial_cls)


def render_scenes(dataset: ScenesDataset, indices: range) -> SceneSplit:
    """Draw scenes ``indices`` of ``dataset`` with every target the quick evaluation needs."""
    samples = [dataset[i] for i in indices]
    return SceneSplit(
        images=[s.image for s in samples],
        labels=torch.tensor([s.label for s in samples], dtype=torch.long),
        class_masks=torch.stack([torch.from_numpy(s.class_mask) for s in samples]),
        depth=torch.stack([torch.from_numpy(s.depth) for s in samples]),
        normals=torch.stack([torch.from_numpy(s.normals).permute(2, 0, 1) for s in samples]),
        spatial_captions=[s.captions["spatial"] for s in samples],
        alt_captions=[s.captions["alt"] for s in samples],
    )


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def encode_split(split: SceneSplit, model: nn.Module, layer_indices: list[int] | None, batch_size: int,
                 progress: bool, desc: str) -> None:
    """Fill the features of ``split`` with one frozen pass of ``model.visual`` (in place).

    With ``layer_indices`` the pass also keeps the normed outputs of those blocks for the DPT.
    """
    device = _device(model)
    indices = layer_indices or [len(model.visual.blocks) - 1]

    def encode(images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        final, layers = model.visual.forward_intermediates(
            images.to(device), indices=indices, norm=True, output_fmt="NCHW", return_prefix_tokens=True
        )
        outputs = (final.global_cls, final.spatial_cls, final.patch_tokens)
        if layer_indices is None:
            return outputs
        return (*outputs, torch.stack([m for m, _ in layers], 1), torch.stack([p for _, p in layers], 1))

    pairs = [(image, index) for index, image in enumerate(split.images)]
    features = extract_features(pairs, pil_to_tensor, encode, batch_size, progress, desc).features
    split.global_cls, split.spatial_cls, split.patch_tokens = features[:3]
    if layer_indices is not None:
        split.intermediates = IntermediateFeatures(features[3], features[4])


@dataclass
class QuickContext:
    """What every quick task reads: the model's text side, both splits and the config."""

    model: nn.Module
    tokenizer: Tokenizer
    train: SceneSplit
    test: SceneSplit
    config: QuickEvalConfig
    progress: bool

    def encode_text(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(token_ids.to(_device(self.model)))

    def embed(self, texts: list[str]) -> torch.Tensor:
        return embed_texts(self.encode_text, self.tokenizer, texts)


def _zeroshot_cls(ctx: QuickContext) -> dict[str, float]:
    classifier = build_text_classifier(
        ctx.encode_text, ctx.tokenizer, ScenesDataset.label_names, get_templates("imagenet80")
    )
    return headline("zeroshot_cls", zero_shot_classification(ctx.test.global_cls, ctx.test.labels, classifier))


def _zeroshot_seg(ctx: QuickContext) -> dict[str, float]:
    size = ctx.config.image_size
    seg_config = ZeroShotSegConfig(short_side=size, window=size, stride=size, templates="tcl9")
    shapes = ScenesDataset.class_names[1:]  # "background" is not a prompt class
    classifier = segmentation_classifier(ctx.encode_text, ctx.tokenizer, shapes, seg_config)
    # shape c (1..8) -> c - 1; background -> 255, ignored
    object_labels = torch.where(ctx.test.class_masks == 0, 255, ctx.test.class_masks - 1)
    dataset = list(zip(ctx.test.images, object_labels.numpy(), strict=True))
    device = _device(ctx.model)

    def dense_encoder(images: torch.Tensor) -> torch.Tensor:
        return values_readout(ctx.model.visual, images.to(device))

    result = evaluate_zero_shot_segmentation(dense_encoder, dataset, classifier, seg_config, progress=ctx.progress)
    return headline("zeroshot_seg", result)


def _retrieval(ctx: QuickContext) -> dict[str, float]:
    text_to_image = torch.arange(len(ctx.test.labels))
    spatial = retrieval_recall(ctx.test.spatial_cls, ctx.embed(ctx.test.spatial_captions), text_to_image)
    alt = retrieval_recall(ctx.test.global_cls, ctx.embed(ctx.test.alt_captions), text_to_image)
    return {**headline("retrieval", spatial), **headline("retrieval_alt", alt)}


def _knn(ctx: QuickContext) -> dict[str, float]:
    train, test = ctx.train, ctx.test
    num_classes = len(ScenesDataset.label_names)
    return headline("knn", knn_classification(train.global_cls, train.labels, test.global_cls, test.labels, num_classes))


def _linear(ctx: QuickContext) -> dict[str, float]:
    train, test, cfg = ctx.train, ctx.test, ctx.config
    classifier_config = LinearClassifierConfig(epochs=cfg.linear_epochs, batch_size=cfg.linear_batch_size, seed=cfg.seed)
    result = train_linear_classifier(
        train.global_cls, train.labels, test.global_cls, test.labels, len(ScenesDataset.label_names), classifier_config
    )
    return headline("linear", result.metrics)


def _seg_probe(ctx: QuickContext) -> dict[str, float]:
    result = linear_segmentation_probe(
        (ctx.train.patch_features, ctx.train.class_masks),
        (ctx.test.patch_features, ctx.test.class_masks),
        num_classes=len(ScenesDataset.class_names),
        config=ctx.config.probe_recipe(LINEAR_SEGMENTATION_RECIPE, ctx.config.seg_probe_lr),
        progress=ctx.progress,
    )
    return headline("seg_probe", result)


def _depth_probe(ctx: QuickContext) -> dict[str, float]:
    result = linear_depth_probe(
        (ctx.train.patch_features, ctx.train.depth),
        (ctx.test.patch_features, ctx.test.depth),
        bins=SCENES_DEPTH_BINS,
        config=ctx.config.probe_recipe(LINEAR_DEPTH_RECIPE, ctx.config.depth_probe_lr),
        progress=ctx.progress,
    )
    return headline("depth_probe", result)


def _dpt_config(ctx: QuickContext) -> DPTConfig:
    # readout = spatial CLS (index 1), the paper's choice for dense tasks
    return DPTConfig(ctx.train.patch_tokens.shape[-1], channels=ctx.config.dpt_channels, readout_index=1)


def _object_normals(split: SceneSplit) -> torch.Tensor:
    """Normals [N, 3, S, S] with the floor zeroed: zero vectors are neither trained on nor scored."""
    return split.normals * (split.class_masks > 0)[:, None]


def _normals_dpt(ctx: QuickContext) -> dict[str, float]:
    result = dpt_normals_probe(
        (ctx.train.intermediates, _object_normals(ctx.train)),
        (ctx.test.intermediates, _object_normals(ctx.test)),
        dpt=_dpt_config(ctx),
        config=ctx.config.probe_recipe(DPT_RECIPE, ctx.config.dpt_lr),
        progress=ctx.progress,
    )
    return headline("normals_dpt", result)


def _depth_dpt(ctx: QuickContext) -> dict[str, float]:
    result = dpt_depth_probe(
        (ctx.train.intermediates, ctx.train.depth),
        (ctx.test.intermediates, ctx.test.depth),
        dpt=_dpt_config(ctx),
        bins=SCENES_DEPTH_BINS,
        config=ctx.config.probe_recipe(DPT_RECIPE, ctx.config.dpt_lr),
        progress=ctx.progress,
    )
    return headline("depth_dpt", result)


QUICK_TASK_RUNNERS: dict[str, Callable[[QuickContext], dict[str, float]]] = {
    "zeroshot_cls": _zeroshot_cls,
    "zeroshot_seg": _zeroshot_seg,
    "retrieval": _retrieval,
    "knn": _knn,
    "linear": _linear,
    "seg_probe": _seg_probe,
    "depth_probe": _depth_probe,
    "normals_dpt": _normals_dpt,
    "depth_dpt": _depth_dpt,
}


@torch.no_grad()
def _encode_splits(ctx: QuickContext) -> None:
    vit = ctx.model.visual
    layers = dpt_layer_indices(len(vit.blocks)) if DPT_TASKS & set(ctx.config.tasks) else None
    for split, name in ((ctx.train, "train"), (ctx.test, "test")):
        encode_split(split, ctx.model, layers, ctx.config.batch_size, ctx.progress, f"quick eval: encode {name}")


def quick_evaluation(
    model: nn.Module, tokenizer: Tokenizer, config: QuickEvalConfig | None = None, progress: bool = True
) -> dict[str, float]:
    """Score a TIPS model (``encode_image`` / ``encode_text`` / ``visual``) on every quick task.

    Returns flat ``{"<task>/<metric>": value}`` (see the module docstring and
    ``tipstorch.eval.report``). The model runs frozen in eval mode on its own device and is put
    back in its previous train/eval mode; the global torch RNG state is restored afterwards, and
    results depend only on (model, config).
    """
    config = config or QuickEvalConfig()
    dataset = ScenesDataset(ScenesConfig(image_size=config.image_size, seed=config.seed))
    train = render_scenes(dataset, range(config.num_train))
    test = render_scenes(dataset, range(config.num_train, config.num_train + config.num_test))
    ctx = QuickContext(model, tokenizer, train, test, config, progress)
    was_training = model.training
    model.eval()
    metrics: dict[str, float] = {}
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            _encode_splits(ctx)
            tasks = tqdm(config.tasks, desc="quick eval", unit="task", disable=not progress)
            for task in tasks:
                tasks.set_postfix_str(task)
                metrics.update(QUICK_TASK_RUNNERS[task](ctx))
    finally:
        model.train(was_training)
    return metrics
