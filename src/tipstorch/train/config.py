"""Typed training configuration: dataclasses, strict YAML loading, ``--set a.b=c`` overrides, YAML dump.

The shipped recipes live in the package (``tipstorch/configs/*.yaml``); ``resolve_config`` turns a bare
name such as ``tiny_cpu`` into the path of the shipped file, any other argument is read as a path.

Defaults are the TIPS paper's recipe (section 4.1 "Implementation details" and appendix A.2) where the
paper gives a number; fields the paper leaves open say where their default comes from. A YAML file may
start from another with ``base: other.yaml`` (resolved next to the file); its sections override the
base's key by key, while values, lists and free-form mappings (``model.vision``, ``data.caption_weights``)
replace the base's whole. Unknown keys are an error naming the key and the file.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from tipstorch.data.collate import MultiCropConfig

BASE_KEY = "base"


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


@dataclass
class ModelCfg:
    """The architecture and the starting weights. ``name`` is a registry name (``tipstorch.list_models()``)
    giving the architecture only; ``vision`` / ``text`` override fields of its VisionConfig / TextConfig
    (or give them all when ``name`` is None). ``init`` gives the weights to start from: None trains from
    scratch, a registered name or export loads the backbone and text tower (heads start new), a training
    checkpoint ``.pt`` also its heads, EMA teacher and centres (see ``train/init.py``)."""

    name: str | None = "tips-tiny"
    vision: dict[str, Any] = field(default_factory=dict)
    text: dict[str, Any] = field(default_factory=dict)
    temperature: float | None = None  # initial contrastive temperature; None = the model config's
    init: str | None = None
    grad_checkpointing: bool = False
    # Attention through F.scaled_dot_product_attention (true), written out (false: the same values, several times
    # faster on a CPU in bf16 for the short sequences of small crops) or chosen per call by device, dtype, sequence
    # length and backward (auto: the measured rule of models/attention.py).
    fused_attention: Literal["auto", True, False] = "auto"
    # From scratch only: fold a pixel normalisation into the initial patch embedding, so the random
    # network starts as if fed (pixels - mean) / std while keeping the [0, 1] input of the released
    # models. Not in the paper; the values are the ImageNet statistics DINOv2 / open_clip normalise with.
    # Without it a random ViT maps all images to nearly the same CLS (cosine ~0.99), and short runs
    # collapse the self-distillation targets. None = the plain random initialisation.
    init_pixel_mean: tuple[float, float, float] | None = (0.485, 0.456, 0.406)
    init_pixel_std: tuple[float, float, float] | None = (0.229, 0.224, 0.225)


@dataclass
class HeadCfg:
    """DINO / iBOT projection heads (identical shapes, unshared weights; appendix A.2)."""

    num_prototypes: int = 32768  # A.2: "prototype dimension of 32k"
    hidden_dim: int = 2048  # not in the paper: DINO / DINOv2 default
    bottleneck_dim: int = 256  # not in the paper: DINO / DINOv2 default
    mlp_layers: int = 3  # A.2: "3-layer MLP"


@dataclass
class DataCfg(MultiCropConfig):
    """Training data and the multi-crop batch. The crop, flip, mask and caption fields and their defaults
    (the paper's: 1 global crop at 224, M = 6 local crops at 98, 75% masking, DINOv2's crop scales,
    TIPS's captions) are those of ``tipstorch.data.collate.MultiCropConfig``, documented there."""

    source: str = "scenes"  # "scenes" (built-in procedural set) or a WebDataset shard pattern
    num_samples: int = 100_000  # images per epoch (scenes: how many are generated)
    num_workers: int = 0
    scenes_size: int = 224  # scenes: side of the generated images the crops are cut from
    scenes_seed: int = 0  # scenes: which procedural scenes (the eval uses other seeds / indices)
    scenes_objects: tuple[int, int] = (1, 4)  # scenes: (min, max) objects drawn per scene
    scenes_object_radius: tuple[float, float] = (0.08, 0.22)  # scenes: object radii, fractions of the short side
    shuffle_buffer: int = 5000  # shards: sample shuffle buffer (not in the paper: open_clip's 5000)


@dataclass
class LossWeights:
    """L = clip_global L_CLIP + clip_spatial L^_CLIP + dino L_distill + ibot L_mask + koleo L_KoLeo (3.2, A.2).
    A weight of 0 switches the term off (and its head and teacher pass)."""

    clip_global: float = 0.5  # 3.2: 1/2 (L_CLIP + L^_CLIP)
    clip_spatial: float = 0.5
    dino: float = 1.0  # A.2: alpha = 1
    ibot: float = 2.0  # A.2: beta = 2
    koleo: float = 0.0  # not in the paper (DINOv2 regulariser), off

    def as_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


@dataclass
class LossCfg:
    weights: LossWeights = field(default_factory=LossWeights)
    student_temp: float = 0.1  # A.2: tau_s = tau'_s = 0.1
    center_momentum: float = 0.9  # A.2: centre = EMA of the score means, momentum 0.9
    ibot_all_tokens: bool = False  # TIPSv2 iBOT++: patch loss on visible tokens too
    contrastive_on_masked: bool = False  # contrastive terms on the masked pass (cheaper) or an unmasked one
    min_temperature: float = 1e-3  # floor for the learnable contrastive temperature (released ~0.005)


@dataclass
class TeacherCfg:
    """full: EMA of the whole student (TIPS, 3.2); heads: EMA of the heads only, the teacher backbone is the
    student's (TIPSv2); frozen: a fixed pretrained teacher distilled into a smaller student (A.1)."""

    mode: Literal["full", "heads", "frozen"] = "full"
    frozen_model: str | None = None  # mode "frozen": registered name or checkpoint of the teacher


@dataclass
class OptimCfg:
    name: Literal["adafactor", "adamw"] = "adafactor"  # A.2: Adafactor
    lr: float = 5e-4  # A.2: peak learning rate
    weight_decay: float = 0.0  # not in the paper
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW only
    eps: float = 1e-8  # AdamW only
    grad_clip_norm: float = 0.0  # not in the paper; 0 = no clipping
    temperature_lr_scale: float = 1.0  # lr multiplier of the contrastive temperature


@dataclass
class ScheduleCfg:
    """Step-indexed schedules (see schedules.py); every value is a function of the step alone."""

    warmup_steps: int = 0  # A.2: linear warm-up for 1.4 epochs
    decay: Literal["linear", "cosine"] = "linear"  # A.2: linear decay ...
    final_lr: float = 0.0  # A.2: ... down to 0
    weight_decay_end: float | None = None  # None = constant weight decay, else cosine to this value
    teacher_momentum_start: float = 0.994  # A.2: cosine schedule from 0.994 ...
    teacher_momentum_end: float = 1.0  # A.2: ... to 1
    dino_teacher_temp: float = 0.07  # A.2: tau_t = 0.07
    ibot_teacher_temp_start: float = 0.04  # A.2: tau'_t warmed up linearly from 0.04 ...
    ibot_teacher_temp_end: float = 0.07  # A.2: ... to 0.07
    ibot_teacher_temp_warmup_steps: int = 0  # not in the paper


@dataclass
class LoopCfg:
    steps: int = 1000
    batch_size: int = 16384  # 4.1: global batch (all ranks, all accumulation steps)
    accumulation_steps: int = 1
    # "auto": bf16 where the device multiplies bf16 in hardware (CUDA with bf16, a CPU with AVX512-BF16 or AMX),
    # float32 elsewhere (emulated bf16 on an AVX2-only CPU was 12x slower than float32: train/precision.py)
    bf16: Literal["auto", True, False] = True
    # How bf16 computes (train/precision.py): "autocast" casts each matmul's operands (float32 parameters and
    # residual stream); "weights" runs the step on bf16 copies of the weights, cast once per step from the float32
    # master weights that the optimiser, the gradients, DDP's all-reduce and the EMA teacher keep (bf16
    # activations end to end, no per-op casts; under FSDP: its bf16 policy without autocast).
    bf16_mode: Literal["autocast", "weights"] = "autocast"
    checkpoint_every: int = 1000  # steps between writes of last.pt (also written at the end and on SIGTERM/SIGINT)
    keep_every: int = 0  # permanent step-<N>.pt at every multiple of it (also writes last.pt then); 0 = none
    log_every: int = 10
    out_dir: str = "runs/tips"
    seed: int = 0
    threads: int = 0  # CPU threads of the training process (torch.set_num_threads); 0 = torch's default
    # Under torchrun (world size > 1): ddp replicates the student, fsdp shards it (FSDP2 fully_shard, for L / SO400m /
    # g; sharded checkpoints). See train/parallel.py.
    parallel: Literal["ddp", "fsdp"] = "ddp"
    # fsdp from scratch: build the model on the meta device and initialise each rank's shards only (no rank holds
    # the whole model; the random draws differ from an unsharded run's). See train/meta_init.py.
    meta_init: bool = False


@dataclass
class EvalCfg:
    every: int = 0  # steps between evaluations; 0 = only before and after training
    tasks: list[str] = field(default_factory=list)  # quick-eval tasks (e.g. knn, seg-probe; tipstorch.eval.quick); empty = its default set
    quick: bool = False  # run tipstorch.eval.quick (scenes zero-shot / retrieval / probes) before and after training
    normals_restarts: int | None = None  # normals DPT decoders per quick evaluation; None = the quick evaluation's (2)
    # CPU threads of the evaluations of a run (no batch is drawn while they run, so they may use the cores the
    # data workers train beside); 0 = torch's default of the process (its cores), whatever loop.threads says
    threads: int = 0


@dataclass
class TrainCfg:
    name: str = "tips"
    model: ModelCfg = field(default_factory=ModelCfg)
    heads: HeadCfg = field(default_factory=HeadCfg)
    data: DataCfg = field(default_factory=DataCfg)
    loss: LossCfg = field(default_factory=LossCfg)
    teacher: TeacherCfg = field(default_factory=TeacherCfg)
    optim: OptimCfg = field(default_factory=OptimCfg)
    schedule: ScheduleCfg = field(default_factory=ScheduleCfg)
    loop: LoopCfg = field(default_factory=LoopCfg)
    eval: EvalCfg = field(default_factory=EvalCfg)

    def __post_init__(self) -> None:
        problems = []
        if self.model.name is None and not (self.model.vision and self.model.text):
            problems.append("model needs a registry name or explicit vision and text fields")
        weights = self.loss.weights.as_dict()
        if any(weight < 0 for weight in weights.values()) or not any(weights.values()):
            problems.append(f"loss.weights must be >= 0 with at least one > 0, got {weights}")
        if self.loss.weights.dino > 0 and self.data.num_local_crops < 1:
            problems.append("loss.weights.dino > 0 needs local crops (data.num_local_crops >= 1)")
        if self.loss.weights.ibot > 0 and self.data.mask_ratio <= 0 and not self.loss.ibot_all_tokens:
            problems.append("loss.weights.ibot > 0 with data.mask_ratio 0 supervises no token (mask, or ibot_all_tokens)")
        if self.loop.batch_size % self.loop.accumulation_steps:
            problems.append(
                f"loop.batch_size ({self.loop.batch_size}) must be a multiple of "
                f"loop.accumulation_steps ({self.loop.accumulation_steps})"
            )
        if self.loop.threads < 0 or self.eval.threads < 0:
            problems.append(f"loop.threads and eval.threads must be >= 0, got {self.loop.threads} and {self.eval.threads}")
        if self.teacher.mode == "frozen" and not self.teacher.frozen_model:
            problems.append("teacher.mode 'frozen' needs teacher.frozen_model (registered name or checkpoint)")
        if problems:
            raise ConfigError("; ".join(problems))


# ---------------------------------------------------------------------------------------------- loading


def shipped_configs_dir() -> Path:
    """The folder of the recipes shipped with the package."""
    return Path(str(resources.files("tipstorch") / "configs"))


def shipped_configs() -> list[str]:
    """Names of the shipped recipes (``tiny_cpu``, ``tips_g14_paper``, ...)."""
    return sorted(path.stem for path in shipped_configs_dir().glob("*.yaml"))


def resolve_config(name_or_path: str | Path) -> Path:
    """An existing file path as given, else the shipped recipe of that name (``tiny_cpu`` or ``tiny_cpu.yaml``)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = shipped_configs_dir() / (path.name if path.suffix == ".yaml" else f"{path.name}.yaml")
    if path.parent == Path(".") and shipped.is_file():
        return shipped
    raise ConfigError(f"config {name_or_path}: no such file, nor a shipped recipe (shipped: {', '.join(shipped_configs())})")


def load_config(
    path: str | Path, overrides: list[str] | tuple[str, ...] = (), check_starting_steps: bool = True
) -> TrainCfg:
    """Read a YAML recipe (following ``base:`` files), apply ``a.b=c`` overrides, return a checked TrainCfg
    (see ``check_starting_steps`` for the check of a starting ``step-<N>.pt`` that does not exist yet)."""
    path = Path(path)
    raw = _read_with_bases(path, seen=())
    for override in overrides:
        _apply_override(raw, override)
    where = f"config {path} (with its bases and --set overrides)"
    cfg = _build(TrainCfg, raw, where=where)
    if check_starting_steps:
        _check_starting_steps(cfg, where)
    return cfg


def _producing_run(run_dir: Path) -> tuple[TrainCfg, str] | None:
    """The config of the run writing to ``run_dir``: its ``config.yaml`` when it has started, else the
    shipped recipe whose ``loop.out_dir`` it is (None when neither is known)."""
    written = run_dir / "config.yaml"
    if written.is_file():
        return load_config(written, check_starting_steps=False), str(written)
    for name in shipped_configs():
        shipped = shipped_configs_dir() / f"{name}.yaml"
        candidate = load_config(shipped, check_starting_steps=False)
        if Path(candidate.loop.out_dir) == run_dir:
            return candidate, f"shipped recipe {name}"
    return None


def _check_starting_steps(cfg: TrainCfg, where: str) -> None:
    """A ``model.init`` / ``teacher.frozen_model`` naming ``<run>/step-<N>.pt`` that does not exist yet
    (a later stage planned before its first stage has run, like tips_hr_finetune.yaml) must name a step
    that run keeps: a multiple of its ``loop.keep_every``, at most its ``loop.steps``."""
    for key, source in (("model.init", cfg.model.init), ("teacher.frozen_model", cfg.teacher.frozen_model)):
        match = re.fullmatch(r"step-(\d+)\.pt", Path(source).name) if source else None
        if match is None or Path(source).exists():
            continue
        run = _producing_run(Path(source).parent)
        if run is None:
            continue
        (producer, described), step = run, int(match[1])
        keep, steps = producer.loop.keep_every, producer.loop.steps
        if not keep or step % keep or step > steps:
            kept = (
                f"keeps step-<N>.pt at multiples of loop.keep_every = {keep} up to step {steps}"
                if keep
                else "keeps none (loop.keep_every = 0)"
            )
            raise ConfigError(
                f"{where}: {key} {source} can never exist: the run writing to {Path(source).parent} "
                f"({described}) {kept}"
            )


def config_from_dict(
    raw: dict[str, Any], where: str = "config", overrides: list[str] | tuple[str, ...] = ()
) -> TrainCfg:
    """Build a TrainCfg from a nested dict (e.g. the ``config`` saved in a checkpoint), with ``a.b=c`` overrides."""
    raw = copy.deepcopy(raw)
    for override in overrides:
        _apply_override(raw, override)
    return _build(TrainCfg, raw, where)


def dump_config(cfg: TrainCfg) -> str:
    """YAML text that ``load_config`` reads back to an equal TrainCfg."""
    return yaml.safe_dump(_plain(dataclasses.asdict(cfg)), sort_keys=False)


def _read_with_bases(path: Path, seen: tuple[Path, ...]) -> dict[str, Any]:
    resolved = path.resolve()
    if resolved in seen:
        raise ConfigError(f"config {path}: 'base' chain loops back to itself ({' -> '.join(map(str, seen))})")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config {path}: top level must be a mapping, got {type(raw).__name__}")
    base = raw.pop(BASE_KEY, None)
    _check_keys(TrainCfg, raw, f"config {path}", prefix="")
    if base is None:
        return raw
    merged = _read_with_bases(path.parent / base, seen + (resolved,))
    _merge_into(merged, raw, TrainCfg)
    return merged


def _merge_into(target: dict[str, Any], update: dict[str, Any], cls: Any) -> None:
    """Sections (dataclasses) merge key by key; values, lists and free-form mappings are replaced whole."""
    fields = _fields(cls)
    for key, value in update.items():
        if dataclasses.is_dataclass(fields[key]) and isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge_into(target[key], value, fields[key])
        else:
            target[key] = value


def _apply_override(raw: dict[str, Any], override: str) -> None:
    key, sep, text = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {override!r}: expected key=value, e.g. loop.steps=100")
    names = key.split(".")
    hint: Any = TrainCfg
    for depth, name in enumerate(names):
        where = ".".join(names[: depth + 1])
        if typing.get_origin(hint) is dict:
            break  # inside a free-form mapping such as model.vision: any key
        if not dataclasses.is_dataclass(hint):
            raise ConfigError(f"--set {key}: '{'.'.join(names[:depth])}' is a value, not a section")
        fields = _fields(hint)
        if name not in fields:
            raise ConfigError(f"--set {key}: unknown key '{where}' (known: {', '.join(fields)})")
        hint = fields[name]
    node = raw
    for name in names[:-1]:
        node = node.setdefault(name, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: '{name}' is not a section")
    node[names[-1]] = yaml.safe_load(text)


def _check_keys(cls: Any, raw: dict[str, Any], where: str, prefix: str) -> None:
    fields = _fields(cls)
    for key, value in raw.items():
        if key not in fields:
            raise ConfigError(f"{where}: unknown key '{prefix}{key}' (known: {', '.join(fields)})")
        if dataclasses.is_dataclass(fields[key]) and isinstance(value, dict):
            _check_keys(fields[key], value, where, prefix=f"{prefix}{key}.")


def _fields(cls: Any) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _build(cls: Any, raw: Any, where: str, prefix: str = "") -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: '{prefix.rstrip('.') or 'top level'}' must be a mapping, got {raw!r}")
    hints = _fields(cls)
    values = {}
    for key, value in raw.items():
        if key not in hints:
            raise ConfigError(f"{where}: unknown key '{prefix}{key}' (known: {', '.join(hints)})")
        values[key] = _convert(hints[key], value, where, f"{prefix}{key}")
    try:
        return cls(**values)
    except ValueError as error:  # ConfigError, or the checks of a section such as DataCfg's crop sizes
        raise ConfigError(f"{where}: {error}") from None


def _convert(hint: Any, value: Any, where: str, key: str) -> Any:
    """Check ``value`` against the type hint and convert lists to tuples / ints to floats where declared."""
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where, prefix=f"{key}.")
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [arg for arg in args if arg is not type(None)]
        return _convert(options[0], value, where, key)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {key} must be one of {list(args)}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple) or len(value) != len(args):
            raise ConfigError(f"{where}: {key} must be a list of {len(args)} values, got {value!r}")
        return tuple(_convert(arg, item, where, f"{key}[{i}]") for i, (arg, item) in enumerate(zip(args, value, strict=True)))
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: {key} must be a list, got {value!r}")
        return [_convert(args[0], item, where, f"{key}[{i}]") for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: {key} must be a mapping, got {value!r}")
        return dict(value)
    if hint is float and isinstance(value, int | float | str) and not isinstance(value, bool):
        try:  # YAML 1.1 reads 5e-4 (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if hint is Any or (isinstance(value, hint) and not (hint is int and isinstance(value, bool))):
        return value
    raise ConfigError(f"{where}: {key} must be {hint.__name__}, got {value!r}")


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    return value
