"""Image embeddings of image units, computed in batches and cached on disk one file per unit.

The cache of a unit is ``<cache_dir>/<embedder fingerprint>/<unit name>.safetensors``: the tensor
``embeddings`` [N, D] float32 (L2-normalised), with the sample keys, the skipped samples and the
unit's signature in the metadata. It is written atomically when the unit is done, so a killed run
resumes at the first unit without a valid cache file; a unit whose files changed is recomputed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image
from safetensors.numpy import load_file, save_file
from tqdm.auto import tqdm

from tipstorch.data.images import ImageFileError, open_image
from tipstorch.data.transforms import InferenceTransform
from tipstorch.engine.image_sources import ImageUnit
from tipstorch.engine.precision import inference_autocast
from tipstorch.models.tips import TIPSModel

logger = logging.getLogger("tipstorch.engine")

EMBEDDINGS = ("global_cls", "spatial_cls")


class ImageEmbedder(Protocol):
    """Images -> L2-normalised embeddings [B, D] float32; ``fingerprint`` names the embedding function."""

    fingerprint: str

    def __call__(self, images: list[Image.Image]) -> np.ndarray: ...


def model_fingerprint(model: torch.nn.Module, extra: object, samples_per_tensor: int = 4096) -> str:
    """A short hash of ``extra`` (e.g. image size) and the model's parameter names, shapes and an evenly
    strided sample of ``samples_per_tensor`` values of each: equal for the same weights, different
    for other weights (another init, a fine-tune), and fast for billion-parameter models."""
    digest = hashlib.sha256(json.dumps(extra, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            flat = tensor.detach().flatten()
            sample = flat[:: max(1, flat.numel() // samples_per_tensor)].float().cpu().numpy()
            digest.update(f"{name}:{tuple(tensor.shape)};".encode())
            digest.update(sample.tobytes())
    return digest.hexdigest()[:16]


class TIPSImageEmbedder:
    """A TIPS model's normalised ``global_cls`` or ``spatial_cls`` [B, D] of images resized to
    ``image_size`` (default: the model's), under bf16 autocast where supported (``precision``)."""

    def __init__(
        self,
        model: TIPSModel,
        image_size: int | None = None,
        embedding: str = "global_cls",
        device: str | torch.device = "cpu",
        precision: str = "auto",
    ) -> None:
        if embedding not in EMBEDDINGS:
            raise ValueError(f"embedding must be one of {EMBEDDINGS}, got {embedding!r}")
        self.model = model.to(device).eval()
        self.transform = InferenceTransform(image_size or model.image_size)
        self.embedding, self.device, self.precision = embedding, torch.device(device), precision
        self.fingerprint = model_fingerprint(
            model, {"image_size": self.transform.image_size, "embedding": embedding}
        )

    def __call__(self, images: list[Image.Image]) -> np.ndarray:
        batch = torch.stack([self.transform(image) for image in images]).to(self.device)
        with torch.inference_mode(), inference_autocast(self.device, self.precision):
            features = self.model.encode_image(batch, normalize=True)
        return getattr(features, self.embedding).float().cpu().numpy()


@dataclass
class UnitEmbeddings:
    """Embeddings [N, D] of a unit's decodable images, their keys, and (key, reason) of skipped ones."""

    keys: list[str]
    embeddings: np.ndarray
    skipped: list[tuple[str, str]] = field(default_factory=list)


def _cache_path(cache_dir: Path, embedder: ImageEmbedder, unit: ImageUnit) -> Path:
    return cache_dir / embedder.fingerprint / f"{unit.name}.safetensors"


def _load_cached(path: Path, unit: ImageUnit) -> UnitEmbeddings | None:
    if not path.is_file():
        return None
    try:
        with path.open("rb") as handle:
            header_size = int.from_bytes(handle.read(8), "little")
            metadata = json.loads(handle.read(header_size)).get("__metadata__", {})
        if metadata.get("signature") != unit.signature():
            logger.info("cache %s is stale (unit %s changed): recomputing", path, unit.name)
            return None
        embeddings = load_file(str(path))["embeddings"]
        skipped = [tuple(pair) for pair in json.loads(metadata["skipped"])]
        return UnitEmbeddings(json.loads(metadata["keys"]), embeddings, skipped)
    except (OSError, ValueError, KeyError) as exn:  # truncated or foreign file: recompute it
        logger.warning("unreadable embedding cache %s (%s): recomputing", path, exn)
        return None


def _save(path: Path, unit: ImageUnit, result: UnitEmbeddings) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    metadata = {
        "keys": json.dumps(result.keys),
        "skipped": json.dumps(result.skipped),
        "signature": unit.signature(),
        "source": unit.source,
    }
    save_file(
        {"embeddings": np.ascontiguousarray(result.embeddings, dtype=np.float32)}, str(temporary), metadata
    )
    os.replace(temporary, path)


def _embed_unit(unit: ImageUnit, embedder: ImageEmbedder, batch_size: int, bar: tqdm) -> UnitEmbeddings:
    keys: list[str] = []
    chunks: list[np.ndarray] = []
    skipped: list[tuple[str, str]] = []
    pending: list[tuple[str, Image.Image]] = []

    def flush() -> None:
        chunks.append(np.asarray(embedder([image for _, image in pending]), dtype=np.float32))
        keys.extend(key for key, _ in pending)
        bar.update(len(pending))
        pending.clear()

    for key, data in unit.images():
        try:
            pending.append((key, open_image(data, name=key)))
        except ImageFileError as exn:
            reason = f"undecodable image: {exn.problem}" if data else "no image member"
            logger.warning("skipped sample %s:%s: %s", unit.source, key, reason)
            skipped.append((key, reason))
            continue
        if len(pending) == batch_size:
            flush()
    if pending:
        flush()
    embeddings = np.concatenate(chunks) if chunks else np.zeros((0, 0), np.float32)
    return UnitEmbeddings(keys, embeddings, skipped)


def embed_units(
    units: Sequence[ImageUnit],
    embedder: ImageEmbedder,
    cache_dir: str | Path,
    batch_size: int = 64,
    progress: bool = True,
    desc: str = "embed",
) -> list[UnitEmbeddings]:
    """Embeddings of every unit, from the cache where valid, else computed and cached."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    results: list[UnitEmbeddings] = []
    with tqdm(desc=desc, unit="img", disable=not progress) as bar:
        for unit in units:
            path = _cache_path(Path(cache_dir), embedder, unit)
            cached = _load_cached(path, unit)
            if cached is None:
                cached = _embed_unit(unit, embedder, batch_size, bar)
                _save(path, unit, cached)
            else:
                bar.update(len(cached.keys))
            results.append(cached)
    return results


@dataclass
class EmbeddingTable:
    """The embeddings [N, D] of a whole source and, per row, (unit index, key)."""

    embeddings: np.ndarray
    ids: list[tuple[int, str]]
    skipped: list[tuple[str, str]]

    @property
    def keys(self) -> list[str]:
        return [key for _, key in self.ids]


def stack_units(results: Sequence[UnitEmbeddings], dim: int | None = None) -> EmbeddingTable:
    """One table from the per-unit results (units without images contribute no rows)."""
    filled = [r.embeddings for r in results if len(r.keys)]
    if filled:
        embeddings = np.concatenate(filled)
    else:
        embeddings = np.zeros((0, dim or 0), np.float32)
    ids = [(index, key) for index, result in enumerate(results) for key in result.keys]
    skipped = [pair for result in results for pair in result.skipped]
    return EmbeddingTable(embeddings, ids, skipped)
