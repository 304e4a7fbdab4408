"""The training loop: orders the calls of one optimiser step, logs, checkpoints and resumes.

It holds no loss maths: one whole step is ``step.py`` (the passes in ``student.py`` and ``teacher.py``,
the losses in ``losses.py``, the contrastive accumulation in ``contrastive_accum.py``, the schedules in
``schedules.py``). A variant (CLIP-only, TIPS, TIPSv2, distillation from a frozen teacher) is a config,
never a branch here.

One step (``Trainer.train_step``): scheduled lr / weight decay -> ``step.forward_backward`` over the
micro-batches (with ``loop.bf16``: under bf16 autocast, or on bf16 copies of the weights, ``precision.py``)
-> gradient clipping -> stop if the loss or the gradient
is not finite (nothing updated, no checkpoint written) -> ``step.update``: centres, optimiser step,
temperature clamp, teacher EMA.

Outputs in ``out_dir``: ``config.yaml``, ``log.jsonl`` (every ``loop.log_every`` steps), ``tensorboard/``,
``last.pt`` / ``previous.pt`` / ``step-<N>.pt`` (see ``run_state.py``; under FSDP the sharded
``last.dcp/`` / ``previous.dcp/`` / ``step-<N>.dcp/`` of ``sharded_checkpoint.py``), ``final.safetensors``
(the student's model, one plain file for ``tipstorch.load_model``, gathered from the shards under FSDP;
the EMA teacher has no text tower, so the student is the image-text model).

Under ``torchrun`` (``distributed.py``) each rank trains its rows of the step's global batch (``data.py``)
with the student wrapped by ``parallel.py`` (DDP or FSDP2, ``loop.parallel``); the logged losses are
averaged over the ranks, so they are the global batch's whatever the world size.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import random
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from tqdm.auto import tqdm

from tipstorch.models.tips import TIPSConfig, TIPSModel
from tipstorch.models.tokenizer import Tokenizer
from tipstorch.train.config import ConfigError, TrainCfg, dump_config
from tipstorch.train.data import EPOCH_KEY, SCENES, training_batches
from tipstorch.train.distributed import (
    DistributedContext,
    any_rank,
    gather_rows,
    max_over_ranks,
    mean_over_ranks,
    setup_distributed,
)
from tipstorch.train.init import (
    build_model,
    build_teacher,
    continue_teacher_and_centres,
    load_heads,
    trainable,
)
from tipstorch.train.losses import TIPSLoss
from tipstorch.train.meta_init import materialize
from tipstorch.train.optim import build_optimizer, clip_gradients, set_hyperparams
from tipstorch.train.parallel import (
    FSDP,
    is_sharded,
    reshard_teacher,
    shard_teacher,
    sync_replicated,
    wrap_student,
)
from tipstorch.train.precision import WEIGHTS, ComputeWeights, use_bf16
from tipstorch.train.run_state import (
    FINAL,
    FORMAT,
    LAST,
    VERSION,
    StopOnSignal,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from tipstorch.train.schedules import TrainingSchedules
from tipstorch.train.sharded_checkpoint import SHARDED_KEY, load_sharded, save_sharded
from tipstorch.train.step import forward_backward, update
from tipstorch.train.student import TIPSStudent
from tipstorch.train.teacher import Teacher
from tipstorch.weights.tipstorch_file import save_model_state

logger = logging.getLogger("tipstorch.train")

Evaluate = Callable[[TIPSModel, Tokenizer], dict[str, float]]
TENSORBOARD_DIR = "tensorboard"
LOG_FILE = "log.jsonl"


class NonFiniteLossError(RuntimeError):
    """The loss or the gradient norm of a step is NaN or infinite; the run stopped before updating."""


@dataclass
class TrainResult:
    """How ``Trainer.fit`` ended: ``completed`` or ``interrupted`` (by ``signal_name``) at ``step``."""

    status: str
    step: int
    checkpoint: Path | None
    export: Path | None = None
    signal_name: str | None = None
    signal_number: int | None = None
    eval_before: dict[str, float] | None = None
    eval_after: dict[str, float] | None = None
    history: list[dict[str, float]] = field(default_factory=list)


class TensorboardLog:
    """Scalars to ``out_dir/tensorboard`` (when tensorboard is installed) and lines to ``out_dir/log.jsonl``."""

    def __init__(self, out_dir: Path) -> None:
        self.jsonl = (out_dir / LOG_FILE).open("a")
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            print("warning: tensorboard is not installed (pip install tensorboard): no tensorboard logs, "
                  f"only {out_dir / LOG_FILE}", file=sys.stderr)
            self.writer = None
        else:
            self.writer = SummaryWriter(str(out_dir / TENSORBOARD_DIR))

    def scalars(self, step: int, values: Mapping[str, float], prefix: str = "train") -> None:
        self.jsonl.write(json.dumps({"step": step, prefix: dict(values)}) + "\n")
        self.jsonl.flush()
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(f"{prefix}/{name}", value, step)

    def close(self) -> None:
        self.jsonl.close()
        if self.writer is not None:
            self.writer.close()


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run the block with ``count`` torch CPU threads, then restore the former count."""
    former = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(former)


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


class Trainer:
    """One training run of a TrainCfg, fresh or resumed from a checkpoint state (``resume``).

    Args:
        cfg: the recipe.
        tokenizer_for: model -> its tokenizer (e.g. ``tipstorch.get_tokenizer``), called on first use (the
            official tokenizer may need a download).
        out_dir: where logs and checkpoints go (default ``cfg.loop.out_dir``).
        resume: a state read by ``run_state.load_checkpoint``; the model is rebuilt from its saved
            architecture (``model.init`` is not loaded again) and every state restored.
        evaluate: (model, tokenizer) -> metrics, run on rank 0 before training (fresh runs), every
            ``eval.every`` steps and after training.
        context: the distributed context (default: ``setup_distributed()``).
    """

    def __init__(
        self,
        cfg: TrainCfg,
        tokenizer_for: Callable[[TIPSModel], Tokenizer],
        out_dir: str | Path | None = None,
        resume: Mapping[str, Any] | None = None,
        evaluate: Evaluate | None = None,
        context: DistributedContext | None = None,
    ) -> None:
        self.cfg, self.evaluate, self.tokenizer_for = cfg, evaluate, tokenizer_for
        self.out_dir = Path(out_dir if out_dir is not None else cfg.loop.out_dir)
        self.context = context or setup_distributed()
        loop, world = cfg.loop, self.context.world_size
        if loop.batch_size % (world * loop.accumulation_steps):
            raise ConfigError(
                f"loop.batch_size ({loop.batch_size}) must be a multiple of world size x accumulation steps "
                f"({world} x {loop.accumulation_steps})"
            )
        self.local_batch = loop.batch_size // world
        if world > 1 and loop.parallel == FSDP and cfg.optim.name == "adafactor":
            raise ConfigError(
                "optim.name 'adafactor' does not run on FSDP shards (torch.optim.Adafactor's in-place norms fail "
                "on DTensor in torch 2.13): use --set optim.name=adamw with loop.parallel=fsdp, or loop.parallel=ddp"
            )
        self.eval_threads = cfg.eval.threads or torch.get_num_threads()  # before loop.threads applies
        if loop.threads > 0:
            torch.set_num_threads(loop.threads)
        _seed_everything(loop.seed)  # the same initial weights on every rank
        self.sharded = world > 1 and loop.parallel == FSDP
        on_meta = self.sharded and loop.meta_init and cfg.model.init is None and cfg.teacher.mode != "frozen"
        with torch.device("meta") if on_meta else contextlib.nullcontext():  # shapes only (meta_init.py)
            if resume is None:
                model, start = build_model(cfg.model)
            else:  # the saved architecture; the weights come with the state
                model, start = trainable(TIPSModel(TIPSConfig(**resume["model_config"])), cfg.model), None
            self.model = model
            self.student = TIPSStudent(model, cfg.heads, cfg.loss)
            self.loaded_heads = load_heads(self.student, start)
            self.teacher: Teacher | None = build_teacher(cfg, self.student)
        if not on_meta:
            self.student.to(self.context.device)
            if self.teacher is not None:
                self.teacher.to(self.context.device)
        self.loss = TIPSLoss(cfg.loss, cfg.heads.num_prototypes).to(self.context.device)
        self.continued = continue_teacher_and_centres(start, self.teacher, self.loss)
        self.bf16 = use_bf16(loop.bf16, self.context.device)  # "auto": where the device has bf16 matmuls
        self.ddp = wrap_student(self.student, loop.parallel, world, self.bf16)  # what runs the student's passes
        if self.sharded:
            shard_teacher(self.teacher, self.bf16)
        if on_meta:
            materialize(self.student, self.teacher, self.context.device, cfg.model, loop.seed, self.context.rank,
                        initialise=resume is None)
        weights_mode = self.bf16 and loop.bf16_mode == WEIGHTS
        self.autocast_dtype = torch.bfloat16 if self.bf16 and not weights_mode else None
        self.compute_weights = (  # under FSDP its policy gathers bf16 parameters (parallel.py)
            ComputeWeights([self.student] + ([self.teacher] if isinstance(self.teacher, nn.Module) else []))
            if weights_mode and not self.sharded
            else None
        )
        self.optimizer = build_optimizer(self.student.named_parameters(), cfg.optim)  # after sharding: DTensors
        self.schedules = TrainingSchedules(cfg.schedule, cfg.optim, loop.steps)
        self.step = 0
        self.data_epoch = 0  # shard streams: the newest epoch of a trained batch (on any rank, once saved)
        self.start_epoch: int | None = None  # shard streams resumed with other consumers: the fresh epoch
        self.eval_before: dict[str, float] | None = None
        self.history: list[dict[str, float]] = []
        torch.manual_seed(loop.seed + self.context.rank)  # per-rank stream of the step's own draws (drop-path)
        if resume is not None:
            self.load_state_dict(resume)

    @functools.cached_property
    def tokenizer(self) -> Tokenizer:
        """The model's tokenizer (loaded on first use: the official one may need a download)."""
        return self.tokenizer_for(self.model)

    # ------------------------------------------------------------------------------------------ state

    def tensor_state(self) -> dict[str, Any]:
        """The state dicts of the student, teacher, loss centres and optimiser (keyed by parameter name);
        under FSDP their values are this rank's DTensor shards."""
        return {
            "student": get_model_state_dict(self.student),
            "teacher": self.teacher.training_state() if self.teacher is not None else {},
            "loss": self.loss.state_dict(),
            "optimizer": get_optimizer_state_dict(self.student, self.optimizer),
        }

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs (a collective call: every rank must call it)."""
        return self.tensor_state() | self.meta_state()

    def meta_state(self) -> dict[str, Any]:
        """The state besides the tensors of ``tensor_state`` (a collective call)."""
        return {
            "step": self.step,
            "model_config": self.model.config.to_dict(),
            "rng": rng_state(lambda tensor: gather_rows(tensor, self.context.device)),
            "data": {"source": self.cfg.data.source, "num_workers": self.cfg.data.num_workers,
                     "world_size": self.context.world_size,
                     "epoch": max_over_ranks(self.data_epoch, self.context.device)},
            "config": json.loads(json.dumps(dataclasses.asdict(self.cfg))),
            "eval_before": self.eval_before or {},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a state read by ``run_state.load_checkpoint``: a single file's (whole tensors, from any
        world size) or a sharded checkpoint's (its tensors read here with DCP, resharded to this run)."""
        if SHARDED_KEY in state:
            tensors = self.tensor_state()
            load_sharded(tensors, state[SHARDED_KEY])
        else:
            tensors = state
        whole = StateDictOptions(full_state_dict=self.sharded and SHARDED_KEY not in state)
        set_model_state_dict(self.student, tensors["student"], options=whole)
        if isinstance(self.teacher, nn.Module) and is_sharded(self.teacher):
            set_model_state_dict(self.teacher, tensors["teacher"], options=whole)
        elif self.teacher is not None:
            self.teacher.load_training_state(tensors["teacher"])
        self.loss.load_state_dict(tensors["loss"])
        set_optimizer_state_dict(self.student, self.optimizer, tensors["optimizer"], options=whole)
        self.step = int(state["step"])
        self.eval_before = dict(state["eval_before"]) or None
        data = state["data"]
        saved, now = (data["num_workers"], data["world_size"]), (self.cfg.data.num_workers, self.context.world_size)
        self.data_epoch = int(data.get("epoch", 0))
        if self.cfg.data.source != SCENES and saved != now:
            self.start_epoch = self.data_epoch + 1
            logger.warning(
                "resuming a shard stream with (num_workers, world_size) = %s instead of %s: the stream restarts "
                "at epoch %d (no sample is seen twice; the untrained rest of epoch %d is skipped)",
                now, saved, self.start_epoch, self.data_epoch)
        set_rng_state(state["rng"], self.context.rank)

    def save(self, keep: bool = False) -> Path:
        """Write ``out_dir/last.pt`` (rank 0; every rank takes part in gathering the state), or under FSDP
        the sharded ``out_dir/last.dcp`` (every rank writes its shards)."""
        if self.sharded:
            meta = {"format": FORMAT, "version": VERSION} | self.meta_state()
            return save_sharded(self.tensor_state(), meta, self.out_dir, self.context.is_main, keep=keep)
        state = self.state_dict()
        path = self.out_dir / LAST
        if self.context.is_main:
            save_checkpoint(state, self.out_dir, keep=keep)
        return path

    def export_state(self) -> dict[str, torch.Tensor]:
        """The whole model's weights on rank 0 (a collective call; other ranks get an empty dict under FSDP)."""
        if not self.sharded:
            return self.model.state_dict()
        whole = get_model_state_dict(self.student, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        prefix = "model."
        return {key[len(prefix):]: value for key, value in whole.items() if key.startswith(prefix)}

    def evaluation_model(self, exported: dict[str, torch.Tensor] | None = None) -> TIPSModel | None:
        """The model to evaluate on rank 0 (a collective call unless ``exported``, this step's
        ``export_state()``, is given): the trained one, or under FSDP an unsharded copy built from the
        gathered weights (None on the other ranks)."""
        if not self.sharded:
            return self.model
        state = self.export_state() if exported is None else exported
        if not self.context.is_main:
            return None
        model = TIPSModel(self.model.config).to(self.context.device)
        model.load_state_dict(state)
        return model

    # ------------------------------------------------------------------------------------------ step

    def train_step(self, batch: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """One optimiser step on this rank's batch (``step.py``); returns the loss parts and step statistics."""
        cfg, values = self.cfg, self.schedules.at(self.step)
        set_hyperparams(self.optimizer, values.lr, values.weight_decay)
        self.optimizer.zero_grad(set_to_none=True)
        batch = dict(batch)
        if EPOCH_KEY in batch:
            self.data_epoch = max(self.data_epoch, int(batch.pop(EPOCH_KEY)))
        batch = {key: value.to(self.context.device, non_blocking=True) for key, value in batch.items()}
        swapped = self.compute_weights.swapped() if self.compute_weights is not None else contextlib.nullcontext()
        with swapped:
            parts = forward_backward(
                self.student, self.teacher, self.loss, batch, values, cfg.loop.accumulation_steps,
                autocast_dtype=self.autocast_dtype, student_pass=self.ddp,
            )
        sync_replicated(self.student)
        reshard_teacher(self.teacher)
        grad_norm = clip_gradients(self.student.parameters(), cfg.optim.grad_clip_norm)
        finite = bool(torch.isfinite(parts["total"])) and bool(torch.isfinite(grad_norm))
        if any_rank([not finite], self.context.device)[0]:
            shown = ", ".join(f"{name}={float(value):.4g}" for name, value in parts.items())
            last = self.out_dir / LAST
            kept = f"the last good checkpoint is {last}" if last.exists() else "no checkpoint was written yet"
            raise NonFiniteLossError(
                f"non-finite loss or gradient at step {self.step} ({shown}, grad_norm={float(grad_norm):.4g}); "
                f"stopped before updating, {kept}. Lower optim.lr, enable optim.grad_clip_norm or check the data."
            )
        update(self.student, self.teacher, self.loss, self.optimizer, values, cfg.loss.min_temperature)
        self.step += 1
        parts = mean_over_ranks(parts)  # each rank's parts are of its rows: their mean is the global batch's
        return {name: float(value) for name, value in parts.items()} | {
            "grad_norm": float(grad_norm), "lr": values.lr, "temperature": self.model.temperature.item(),
            "teacher_momentum": values.teacher_momentum,
        }

    # ------------------------------------------------------------------------------------------ run

    def run_evaluation(self, exported: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
        """The evaluation's metrics on rank 0 (a collective call under FSDP; {} on the other ranks);
        ``exported`` as for ``evaluation_model``."""
        model = self.evaluation_model(exported)
        if model is None:
            return {}
        model.eval()
        try:
            with torch_threads(self.eval_threads):
                return self.evaluate(model, self.tokenizer)
        finally:
            model.train()

    def batches(self) -> Iterable[dict[str, torch.Tensor]]:
        return training_batches(
            self.cfg.data, self.tokenizer, self.tokenizer.context_length, self.local_batch, self.cfg.loop.seed,
            self.step, self.cfg.loop.steps, self.context.rank, self.context.world_size, self.start_epoch,
        )

    def fit(self, batches: Iterable[Mapping[str, torch.Tensor]] | None = None) -> TrainResult:
        """Train from ``self.step`` to ``loop.steps``; stops early (after a checkpoint) on SIGTERM / SIGINT.

        ``batches`` defaults to the configured stream from the current step. Raises NonFiniteLossError
        (no checkpoint written for the failing step).
        """
        loop, main = self.cfg.loop, self.context.is_main
        evaluating = self.evaluate is not None  # every rank takes part (FSDP gathers the model), rank 0 logs
        if main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "config.yaml").write_text(dump_config(self.cfg))
        log = TensorboardLog(self.out_dir) if main else None
        if evaluating and self.step == 0 and self.eval_before is None:
            self.eval_before = self.run_evaluation() or None
            if main and self.eval_before:
                log.scalars(self.step, self.eval_before, prefix="eval")
        progress = tqdm(total=loop.steps, initial=self.step, desc="train", unit="step", disable=not main,
                        dynamic_ncols=True)
        saved_step = self.step
        result = TrainResult("completed", self.step, None, eval_before=self.eval_before, history=self.history)
        try:
            with StopOnSignal() as stop:
                tick = time.perf_counter()
                for batch in batches if batches is not None else self.batches():
                    if self.step >= loop.steps:
                        break
                    metrics = self.train_step(batch)
                    now = time.perf_counter()
                    metrics["images_per_s"] = loop.batch_size / (now - tick)
                    tick = now
                    self.history.append(metrics)
                    progress.update()
                    if main and (self.step % loop.log_every == 0 or self.step == loop.steps):
                        progress.set_postfix_str(_postfix(metrics), refresh=False)
                        log.scalars(self.step, metrics)
                    if evaluating and self.cfg.eval.every and self.step % self.cfg.eval.every == 0 and self.step < loop.steps:
                        metrics = self.run_evaluation()
                        if main:
                            log.scalars(self.step, metrics, prefix="eval")
                    if any_rank([stop.requested is not None], self.context.device)[0]:
                        result.checkpoint = self.save() if saved_step != self.step else self.out_dir / LAST
                        result.status, result.signal_name = "interrupted", stop.requested or "signal on another rank"
                        result.signal_number, result.step = stop.signal_number, self.step
                        return result
                    keep = bool(loop.keep_every) and self.step % loop.keep_every == 0  # any checkpoint_every
                    if keep or self.step % loop.checkpoint_every == 0 or self.step == loop.steps:
                        result.checkpoint, saved_step = self.save(keep=keep), self.step
            result.step = self.step
            progress.close()
            exported = self.export_state()
            if main:
                result.export = save_model_state(self.model.config, exported, self.out_dir / FINAL)
            if evaluating:
                result.eval_after = self.run_evaluation(exported) or None  # the weights gathered once
                if main and result.eval_after:
                    log.scalars(self.step, result.eval_after, prefix="eval")
        finally:
            progress.close()
            if log is not None:
                log.close()
        return result


def _postfix(metrics: Mapping[str, float]) -> str:
    shown = {name: value for name, value in metrics.items() if name not in ("lr", "teacher_momentum", "grad_norm")}
    return " ".join(f"{name}={value:.3g}" for name, value in shown.items())
