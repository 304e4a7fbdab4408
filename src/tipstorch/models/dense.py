"""Dense prediction heads on frozen TIPS features: DPT decoders and linear probes.

The DPT decoder reproduces the architecture and parameter names of the official
``pytorch/decoders.py`` (google-deepmind/tips), so the released TIPSv2 DPT heads load into it
(``load_scenic_dpt``) and a state_dict of the official PyTorch port loads unchanged:

    dpt.reassemble.{readout_projects, out_projections, resize_layers}.{i}
    dpt.convs.{i}, dpt.fusion_blocks.{i}.{residual_unit, main_unit}.{conv1, conv2}
    dpt.fusion_blocks.{i}.out_conv, dpt.project, head            (+ buffer bin_centers for depth)

Inputs are the outputs of ``VisionTransformer.forward_intermediates(..., norm=True,
output_fmt="NCHW", return_prefix_tokens=True, intermediates_only=True)``: a list of 4
``(patch_map [B, D, h, w], prefix [B, 2, D])`` pairs, prefix = (CLS1 global, CLS2 spatial).
The released heads read out CLS1 (the official notebook feeds ``get_intermediate_layers(...,
return_class_token=True)``, whose class token is token 0), hence ``readout_index=0``.
"""

from __future__ import annotations

import math
import re
import warnings
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

Intermediates = Sequence[tuple[torch.Tensor, torch.Tensor]]

# DPT input layers per released size (0-based block indices), from the official notebook
# pytorch/TIPS_decoder_inference.ipynb (INTERMEDIATE_LAYERS_MAP); the paper (A.4.1) gives the
# 1-based l = 10, 20, 30, 40 for ViT-g/14. ``dpt_layer_indices(depth)`` reproduces all four.
DPT_LAYER_INDICES: dict[str, tuple[int, ...]] = {
    "b": (2, 5, 8, 11),
    "l": (5, 11, 17, 23),
    "so400m": (6, 13, 20, 26),
    "g": (9, 19, 29, 39),
}


def dpt_layer_indices(depth: int, num_layers: int = 4) -> list[int]:
    """Evenly spaced 0-based block indices ending at the last block: ceil((k+1)*depth/n) - 1."""
    if depth < num_layers:
        raise ValueError(f"a ViT of depth {depth} has fewer than {num_layers} blocks for the DPT")
    return [math.ceil((k + 1) * depth / num_layers) - 1 for k in range(num_layers)]


# --------------------------------------------------------------------------------------------
# DPT building blocks (official architecture)
# --------------------------------------------------------------------------------------------


class PreActResidualConvUnit(nn.Module):
    """x + conv2(relu(conv1(relu(x)))), 3x3 convs without bias."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class FeatureFusionBlock(nn.Module):
    """Adds a refined skip input (resized to x if needed), refines, upsamples x2, 1x1 conv."""

    def __init__(self, channels: int, has_residual: bool) -> None:
        super().__init__()
        if has_residual:
            self.residual_unit = PreActResidualConvUnit(channels)
        self.main_unit = PreActResidualConvUnit(channels)
        self.out_conv = nn.Conv2d(channels, channels, 1, bias=True)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, C, h, w], skip [B, C, h', w'] -> [B, C, 2h, 2w]."""
        if skip is not None:
            if skip.shape != x.shape:
                skip = F.interpolate(skip, size=x.shape[2:], mode="bilinear", align_corners=False)
            x = x + self.residual_unit(skip)
        x = self.main_unit(x)
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
        return self.out_conv(x)


class ReassembleBlocks(nn.Module):
    """Readout "project" (concat patch + CLS, Linear 2D->D, tanh-GELU), 1x1 conv, resize x4/x2/x1/x0.5."""

    def __init__(self, embed_dim: int, out_channels: Sequence[int], readout_index: int = 0) -> None:
        super().__init__()
        self.readout_index = readout_index
        self.readout_projects = nn.ModuleList([nn.Linear(2 * embed_dim, embed_dim) for _ in out_channels])
        self.out_projections = nn.ModuleList([nn.Conv2d(embed_dim, ch, 1) for ch in out_channels])
        self.resize_layers = nn.ModuleList([
            nn.ConvTranspose2d(out_channels[0], out_channels[0], kernel_size=4, stride=4),
            nn.ConvTranspose2d(out_channels[1], out_channels[1], kernel_size=2, stride=2),
            nn.Identity(),
            nn.Conv2d(out_channels[3], out_channels[3], 3, stride=2, padding=1),
        ])

    def forward(self, features: Intermediates) -> list[torch.Tensor]:
        """4 x (patch_map [B, D, h, w], prefix [B, P, D]) -> maps at 4h, 2h, h, h/2 resolution."""
        outputs = []
        for i, (patch_map, prefix) in enumerate(features):
            b, d, h, w = patch_map.shape
            tokens = patch_map.flatten(2).transpose(1, 2)
            readout = prefix[:, self.readout_index, None, :].expand(-1, tokens.shape[1], -1)
            # the Scenic heads were trained with JAX's default (tanh) GELU
            tokens = F.gelu(self.readout_projects[i](torch.cat([tokens, readout], dim=-1)), approximate="tanh")
            x = tokens.transpose(1, 2).reshape(b, d, h, w)
            outputs.append(self.resize_layers[i](self.out_projections[i](x)))
        return outputs


class DPTHead(nn.Module):
    """Reassemble 4 layers, project each to ``channels``, fuse bottom-up, 3x3 ``project`` conv
    (followed by a ReLU only with ``output_activation``; see ``DPTConfig``).

    Output [B, channels, 16 * ceil(h / 2), 16 * ceil(w / 2)], i.e. 8h x 8w for even patch grids.
    """

    def __init__(
        self,
        embed_dim: int,
        channels: int,
        post_process_channels: Sequence[int],
        readout_index: int,
        output_activation: bool = False,
    ) -> None:
        super().__init__()
        self.output_activation = output_activation
        self.reassemble = ReassembleBlocks(embed_dim, post_process_channels, readout_index)
        self.convs = nn.ModuleList([nn.Conv2d(ch, channels, 3, padding=1, bias=False) for ch in post_process_channels])
        self.fusion_blocks = nn.ModuleList([FeatureFusionBlock(channels, has_residual=i > 0) for i in range(4)])
        self.project = nn.Conv2d(channels, channels, 3, padding=1, bias=True)

    def forward(self, features: Intermediates) -> torch.Tensor:
        maps = [conv(x) for conv, x in zip(self.convs, self.reassemble(features), strict=True)]
        out = self.fusion_blocks[0](maps[3])
        for i in range(1, 4):
            out = self.fusion_blocks[i](out, maps[3 - i])
        out = self.project(out)
        return F.relu(out) if self.output_activation else out


@dataclass
class DPTConfig:
    """DPT decoder shape. Defaults follow the official decoders.py / decoder notebook.

    ``output_activation``: a ReLU between the DPT ``project`` conv and the per-pixel head. The
    released heads were trained without it: the official ``pytorch/decoders.py`` (google-deepmind/tips
    at 4db271d) defaults ``output_activation=False`` (lines 168 and 202-205), and the commit that
    introduced the flag (b9d4418, "Fix DPT decoder ... for Scenic parity") states that Scenic's
    ``dpt_head_from_config`` sets it to False; the ReLU added in dad6e8f was removed for that reason.
    transformers' ``Tipsv2DptConfig.depth_decoder_activation="relu"`` applies it to the depth head
    (``Tipsv2DptDecoder.forward``); ``load_transformers_dpt`` follows the released weights unless asked
    to reproduce transformers.
    """

    embed_dim: int
    channels: int = 256
    readout_index: int = 0  # 0 = CLS1 (released heads); the paper's own probes use 1 = CLS2
    output_activation: bool = False
    layer_indices: tuple[int, ...] | None = None  # blocks read (0-based); None = dpt_layer_indices(depth)

    def __post_init__(self) -> None:
        if self.layer_indices is not None:
            self.layer_indices = tuple(int(index) for index in self.layer_indices)
            if len(self.layer_indices) != 4:
                raise ValueError(f"a DPT reads 4 layers, got layer_indices={self.layer_indices}")

    def layers_for(self, depth: int) -> list[int]:
        """The 0-based block indices this DPT reads from a ViT with ``depth`` blocks."""
        return list(self.layer_indices) if self.layer_indices is not None else dpt_layer_indices(depth)

    @property
    def post_process_channels(self) -> tuple[int, int, int, int]:
        d = self.embed_dim
        return (d // 8, d // 4, d // 2, d)


class DPTDecoder(nn.Module):
    """DPT features + per-pixel Linear head; forward gives raw outputs [B, out_channels, H, W]."""

    def __init__(self, config: DPTConfig, out_channels: int) -> None:
        super().__init__()
        self.config = config
        self.dpt = DPTHead(
            config.embed_dim, config.channels, config.post_process_channels, config.readout_index,
            config.output_activation,
        )
        self.head = nn.Linear(config.channels, out_channels)

    def raw(self, features: Intermediates) -> torch.Tensor:
        """Head outputs at DPT resolution [B, out_channels, 8h, 8w] (even h, w; see DPTHead)."""
        x = self.dpt(features).permute(0, 2, 3, 1)
        return self.head(x).permute(0, 3, 1, 2)

    def forward(self, features: Intermediates, image_size: tuple[int, int] | None = None) -> torch.Tensor:
        out = self.raw(features)
        if image_size is not None:
            out = F.interpolate(out, size=image_size, mode="bilinear", align_corners=False)
        return out


class DPTSegmentationDecoder(DPTDecoder):
    """Class logits [B, num_classes, H, W] (150 for the released ADE20K head)."""

    def __init__(self, config: DPTConfig, num_classes: int = 150) -> None:
        super().__init__(config, num_classes)


def bins_to_depth(logits: torch.Tensor, bin_centers: torch.Tensor, eps: float) -> torch.Tensor:
    """Depth [B, 1, h, w] as the expectation over bins of relu(logits [B, K, h, w]) + eps, normalised."""
    weights = F.relu(logits) + eps
    probs = weights / weights.sum(dim=1, keepdim=True)
    return torch.einsum("bkhw,k->bhw", probs, bin_centers.to(logits.dtype))[:, None]


@dataclass
class DepthBinsConfig:
    """Uniform depth bins. Defaults: 256 bins over linspace(0.001, 10) m (official DepthDecoder, NYUv2)."""

    num_bins: int = 256
    min_depth: float = 1e-3
    max_depth: float = 10.0


class DPTDepthDecoder(DPTDecoder):
    """Depth in metres [B, 1, H, W]: bin classification, relu + min_depth normalisation, expectation."""

    def __init__(self, config: DPTConfig, bins: DepthBinsConfig | None = None) -> None:
        bins = bins or DepthBinsConfig()
        super().__init__(config, bins.num_bins)
        self.min_depth = bins.min_depth
        self.register_buffer("bin_centers", torch.linspace(bins.min_depth, bins.max_depth, bins.num_bins))

    def forward(self, features: Intermediates, image_size: tuple[int, int] | None = None) -> torch.Tensor:
        # the official decoder uses min_depth as the normalisation epsilon
        depth = bins_to_depth(self.raw(features), self.bin_centers, eps=self.min_depth)
        if image_size is not None:
            depth = F.interpolate(depth, size=image_size, mode="bilinear", align_corners=False)
        return depth


def unit_vectors(x: torch.Tensor, dim: int = 1, eps: float = 1e-12) -> torch.Tensor:
    """x / max(||x||, eps) along ``dim`` (``F.normalize``), e.g. normals [B, 3, H, W] along the channels.

    Written as the square root of a sum of squares: on CPU, ``F.normalize``'s norm over the channels of an
    NCHW tensor takes ~12x longer, forward and backward (19 vs 1.6 ms for [8, 3, 112, 112]).
    """
    return x / (x * x).sum(dim=dim, keepdim=True).clamp_min(eps * eps).sqrt()  # finite gradient at 0


class DPTNormalsDecoder(DPTDecoder):
    """Unit surface normals [B, 3, H, W]: normalise, upsample bicubic, renormalise (official notebook)."""

    def __init__(self, config: DPTConfig) -> None:
        super().__init__(config, 3)

    def forward(self, features: Intermediates, image_size: tuple[int, int] | None = None) -> torch.Tensor:
        normals = unit_vectors(self.raw(features))
        if image_size is not None:
            normals = F.interpolate(normals, size=image_size, mode="bicubic", align_corners=False)
            normals = unit_vectors(normals)
        return normals


# --------------------------------------------------------------------------------------------
# Linear probes (paper A.4.1: "a simple linear layer (segmentation, depth)")
# --------------------------------------------------------------------------------------------


def patch_grid_with_cls(patch_tokens: torch.Tensor, cls_token: torch.Tensor | None) -> torch.Tensor:
    """patch_tokens [B, h, w, D] (+ cls_token [B, D] copied to every patch) -> [B, D or 2D, h, w]."""
    grid = patch_tokens.permute(0, 3, 1, 2)
    if cls_token is None:
        return grid
    b, _, h, w = grid.shape
    return torch.cat([grid, cls_token[:, :, None, None].expand(b, -1, h, w)], dim=1)


class LinearSegmentationHead(nn.Module):
    """BatchNorm + 1x1 linear classifier on patch tokens (+ spatial CLS), bilinear to image size.

    The BatchNorm follows DINOv2's linear segmentation head (mmseg BNHead); it is an affine map
    at test time, so the probe stays linear.
    """

    def __init__(self, embed_dim: int, num_classes: int, use_cls: bool = True, batch_norm: bool = True) -> None:
        super().__init__()
        in_dim = embed_dim * (2 if use_cls else 1)
        self.use_cls = use_cls
        self.norm = nn.BatchNorm2d(in_dim) if batch_norm else nn.Identity()
        self.classifier = nn.Conv2d(in_dim, num_classes, 1)

    def forward(
        self, patch_tokens: torch.Tensor, cls_token: torch.Tensor | None, image_size: tuple[int, int]
    ) -> torch.Tensor:
        """patch_tokens [B, h, w, D], cls_token [B, D] -> logits [B, num_classes, H, W]."""
        x = patch_grid_with_cls(patch_tokens, cls_token if self.use_cls else None)
        logits = self.classifier(self.norm(x))
        return F.interpolate(logits, size=image_size, mode="bilinear", align_corners=False)


class LinearDepthHead(nn.Module):
    """Linear depth probe: patch tokens (+ spatial CLS) upsampled x4, 1x1 linear to 256 bins, expectation.

    Paper A.4.1 (after DINOv2): concatenate the CLS token, upsample by 4, classify into 256
    uniform bins. The normalisation epsilon 0.1 is the AdaBins "linear" strategy used by the
    DINOv2 depth heads.
    """

    def __init__(
        self,
        embed_dim: int,
        bins: DepthBinsConfig | None = None,
        use_cls: bool = True,
        upsample_factor: int = 4,
        eps: float = 0.1,
    ) -> None:
        super().__init__()
        bins = bins or DepthBinsConfig()
        in_dim = embed_dim * (2 if use_cls else 1)
        self.use_cls = use_cls
        self.upsample_factor = upsample_factor
        self.eps = eps
        self.classifier = nn.Conv2d(in_dim, bins.num_bins, 1)
        self.register_buffer("bin_centers", torch.linspace(bins.min_depth, bins.max_depth, bins.num_bins))

    def forward(
        self, patch_tokens: torch.Tensor, cls_token: torch.Tensor | None, image_size: tuple[int, int]
    ) -> torch.Tensor:
        """patch_tokens [B, h, w, D], cls_token [B, D] -> depth in metres [B, 1, H, W]."""
        x = patch_grid_with_cls(patch_tokens, cls_token if self.use_cls else None)
        x = F.interpolate(x, scale_factor=self.upsample_factor, mode="bilinear", align_corners=False)
        depth = bins_to_depth(self.classifier(x), self.bin_centers, eps=self.eps)
        return F.interpolate(depth, size=image_size, mode="bilinear", align_corners=False)


# --------------------------------------------------------------------------------------------
# Loading the released Scenic (Flax) DPT heads
# --------------------------------------------------------------------------------------------

# Flax parameter path (after stripping "decoder/" and "dpt/") -> (torch name, layout)
_FLAX_RULES: tuple[tuple[str, str, str], ...] = (
    (r"reassemble_blocks/out_projection_(\d)/(kernel|bias)", r"dpt.reassemble.out_projections.\1.", "conv"),
    (r"reassemble_blocks/readout_projects_(\d)/(kernel|bias)", r"dpt.reassemble.readout_projects.\1.", "dense"),
    (r"reassemble_blocks/resize_layers_([01])/(kernel|bias)", r"dpt.reassemble.resize_layers.\1.", "conv_transpose"),
    (r"reassemble_blocks/resize_layers_(3)/(kernel|bias)", r"dpt.reassemble.resize_layers.\1.", "conv"),
    (r"convs_(\d)/(kernel)", r"dpt.convs.\1.", "conv"),
    (r"fusion_blocks_0/PreActResidualConvUnit_0/(conv[12])/(kernel)", r"dpt.fusion_blocks.0.main_unit.\1.", "conv"),
    (r"fusion_blocks_([1-3])/PreActResidualConvUnit_0/(conv[12])/(kernel)",
     r"dpt.fusion_blocks.\1.residual_unit.\2.", "conv"),
    (r"fusion_blocks_([1-3])/PreActResidualConvUnit_1/(conv[12])/(kernel)", r"dpt.fusion_blocks.\1.main_unit.\2.", "conv"),
    (r"fusion_blocks_(\d)/(?:Conv_0|out_conv)/(kernel|bias)", r"dpt.fusion_blocks.\1.out_conv.", "conv"),
    (r"project/(kernel|bias)", r"dpt.project.", "conv"),
    (r"(?:pixel_segmentation|pixel_depth_classif|pixel_depth_regress|pixel_normals|segmentation_head)/(kernel|bias)",
     "head.", "dense"),
)


def _flax_to_torch(flax_name: str, value: np.ndarray) -> tuple[str, torch.Tensor] | None:
    """Map one Flax parameter (name, array) to (torch state_dict name, tensor in torch layout);
    None for an array that is not a DPT decoder parameter (optimizer state, other heads, ...)."""
    path = flax_name.removeprefix("decoder/").removeprefix("dpt/")
    for pattern, prefix, layout in _FLAX_RULES:
        match = re.fullmatch(pattern, path)
        if match is None:
            continue
        leaf = match.groups()[-1]
        name = match.expand(prefix) + ("weight" if leaf == "kernel" else "bias")
        if leaf == "bias":
            return name, torch.from_numpy(np.ascontiguousarray(value))
        if layout == "dense":  # (in, out) -> (out, in)
            array = value.T
        elif layout == "conv":  # (kh, kw, in, out) -> (out, in, kh, kw)
            array = value.transpose(3, 2, 0, 1)
        else:  # Flax ConvTranspose correlates with the unflipped kernel: flip, then (in, out, kh, kw)
            array = value[::-1, ::-1].transpose(2, 3, 0, 1)
        return name, torch.from_numpy(np.ascontiguousarray(array))
    return None


def load_checked_state(decoder: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into ``decoder``: every parameter present with its shape (buffers may be absent)."""
    expected = decoder.state_dict()
    buffers = {name for name, _ in decoder.named_buffers()}
    missing = sorted(set(expected) - set(state) - buffers)
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise KeyError(f"{source}: DPT parameters missing {missing[:8]}, unexpected {unexpected[:8]}")
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise ValueError(
                f"{source}: {name} has shape {tuple(tensor.shape)}, decoder expects {tuple(expected[name].shape)} "
                f"(wrong model size or task?)"
            )
    decoder.load_state_dict(state, strict=False)


def read_scenic_dpt(path: str | Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(decoder state_dict in torch layout, sorted names of the arrays that are not decoder parameters)
    of a released Scenic DPT zip (Flax parameters as ``.npy`` files named by their '/'-separated tree
    path, e.g. ``decoder/dpt/convs_0/kernel.npy``) or an ``.npz`` with the same keys."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"DPT checkpoint not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except (zipfile.BadZipFile, ValueError, OSError) as err:
        raise ValueError(f"{path} is not a zip/npz of .npy arrays: {err}") from err
    state, unused = {}, []
    for key, value in arrays.items():
        converted = _flax_to_torch(key, value)
        if converted is None:
            unused.append(key)
        else:
            state[converted[0]] = converted[1]
    return state, sorted(unused)


def load_scenic_dpt(decoder: DPTDecoder, path: str | Path) -> DPTDecoder:
    """Load a released Scenic DPT head (see ``read_scenic_dpt``) into ``decoder`` in place; return it.

    Every decoder parameter must be present with the right shape. Arrays the decoder does not use
    are skipped, as the official ``load_decoder_weights`` skips them, and named in a warning.
    """
    state, unused = read_scenic_dpt(path)
    load_checked_state(decoder, state, str(path))
    if unused:
        warnings.warn(f"{path}: ignored {len(unused)} array(s) the DPT decoder does not use: "
                      f"{', '.join(unused[:8])}{' ...' if len(unused) > 8 else ''}", stacklevel=2)
    return decoder


# --------------------------------------------------------------------------------------------
# Decoders by task (the three released heads)
# --------------------------------------------------------------------------------------------

DENSE_TASKS: tuple[str, ...] = ("segmentation", "depth", "normals")
ADE20K_NUM_CLASSES = 150  # the released segmentation heads (official notebook: ADE20K, 150 classes)


def create_dpt_decoder(
    task: str, config: DPTConfig, num_classes: int = ADE20K_NUM_CLASSES, bins: DepthBinsConfig | None = None
) -> DPTDecoder:
    """The DPT decoder of a task: "segmentation" (num_classes logits), "depth" (bins) or "normals"."""
    if task == "segmentation":
        return DPTSegmentationDecoder(config, num_classes)
    if task == "depth":
        return DPTDepthDecoder(config, bins)
    if task == "normals":
        return DPTNormalsDecoder(config)
    raise ValueError(f"unknown dense task {task!r}; choose from {', '.join(DENSE_TASKS)}")


def dense_task_of(decoder: nn.Module) -> str:
    """The task name of a DPT decoder instance."""
    for task, kind in (("segmentation", DPTSegmentationDecoder), ("depth", DPTDepthDecoder),
                       ("normals", DPTNormalsDecoder)):
        if isinstance(decoder, kind):
            return task
    raise TypeError(f"{type(decoder).__name__} is not a DPT task decoder")
