"""Quick evaluation on the built-in scenes data: every task type of the paper, scaled down for a CPU.

A preset of the one evaluation pipeline (``tipstorch.eval.tasks``): the tasks ``QUICK_TASKS`` on
the ``scenes`` data key with the settings ``QUICK_SETTINGS``. ``quick_evaluation(model, tokenizer)``
renders two disjoint index ranges of a seeded ``ScenesDataset`` (``tipstorch.data.scene_splits``;
train: ``[0, scenes_train)``, test: ``[scenes_train, scenes_train + scenes_test)``; the seed 1234
differs from the training default 0, so no test scene was seen in training), then scores:

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
retrieval r1 ~ 1/scenes_test, zeroshot_seg/miou ~ 0.03-0.07. The probes learn from random features too
(colour, position), so their random-model numbers are a baseline to beat, not chance.

Differences from the paper's protocols, all for speed: one resolution for everything
(``image_size``), a few hundred images, probe schedules cut to ``probe_iterations`` with the
learning rates of ``QUICK_SETTINGS`` (the paper's are tuned for 40k-50k iterations), a DPT
with ``dpt_channels`` fusion channels instead of 256, features computed without
augmentation, the zero-shot segmentation window = the whole image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from torch import nn

from tipstorch.eval.context import SCENES, EvalContext, EvalSettings, FrozenModel
from tipstorch.eval.features import Tokenizer
from tipstorch.eval.tasks import TASKS, run_tasks

# the default task list; depth-dpt (slow) is opt-in
QUICK_TASKS: tuple[str, ...] = (
    "zeroshot-cls", "zeroshot-seg", "retrieval", "knn", "linear", "seg-probe", "depth-probe", "normals-dpt",
)  # fmt: skip
SCENE_TASKS: tuple[str, ...] = tuple(name for name, task in TASKS.items() if SCENES in task.data)

# Sizes that keep tips-tiny at ~1-2 min on 2 CPU cores: 112 px = the tiny_cpu training crops; 512 / 256
# scenes; probes cut to 300 iterations of batch 8 with learning rates raised for the short schedules
# (paper: 1e-3 / 1e-4 / 1e-4 over 40k-50k iterations); the linear classifier 30 epochs of batch 64
# (paper: 10 epochs, batch 1024 on ImageNet; the DINOv2 learning-rate grid is kept); 64 DPT channels;
# two normals decoders, the one with the lower training loss scored (of 4 probe seeds on the same features
# one ended with part of its predictions mirrored: 29.8 vs 22.9-25.4 deg; docs/recipe.md).
QUICK_SETTINGS = EvalSettings(
    image_size=112, batch_size=32, seed=0, probe_iterations=300, probe_batch_size=8,
    seg_probe_lr=1e-2, depth_probe_lr=1e-2, dpt_lr=1e-3, linear_epochs=30, linear_batch_size=64, dpt_channels=64,
    scenes_train=512, scenes_test=256, normals_restarts=2,
)  # fmt: skip


def check_scene_tasks(tasks: Sequence[str]) -> tuple[str, ...]:
    """``tasks`` as a tuple, if it is a non-empty subset of ``SCENE_TASKS``; else ValueError naming them."""
    tasks = tuple(tasks)
    if not tasks or any(task not in SCENE_TASKS for task in tasks):
        raise ValueError(f"quick evaluation tasks must be a non-empty subset of {SCENE_TASKS}, got {tasks}")
    return tasks


def quick_evaluation(
    model: nn.Module,
    tokenizer: Tokenizer,
    settings: EvalSettings = QUICK_SETTINGS,
    tasks: Sequence[str] = QUICK_TASKS,
    progress: bool = True,
) -> dict[str, float]:
    """Score a TIPS model (``encode_image`` / ``encode_text`` / ``visual``) on ``tasks`` on the scenes.

    Returns flat ``{"<task name>/<metric>": value}`` (see the module docstring and
    ``tipstorch.eval.report``). The model runs frozen in eval mode on its own device and is put
    back in its previous train/eval mode; the global torch RNG state is restored afterwards, and
    results depend only on (model, settings, tasks).
    """
    tasks = check_scene_tasks(tasks)
    device = next(model.parameters()).device
    ctx = EvalContext(FrozenModel(model, tokenizer, device, bf16=False), replace(settings, progress=progress))
    results = run_tasks(ctx, [(task, SCENES, None) for task in tasks], desc="quick eval")
    return {metric: value for result in results.values() for metric, value in result.metrics.items()}
