"""The built-in "scenes" dataset: procedural images with captions and dense labels, no files.

Each sample shows 1-4 objects (eight shape classes, four of them curved and rendered as 3-D
bumps) with a colour, a texture and a size, standing on a textured floor seen by an orthographic
camera. The same seeded draw gives the image, four captions (see ``scene_captions``), a class
mask, an instance mask, metric depth, surface normals and a scene-level label, all consistent
with each other by construction:

- camera: orthographic, looking along +depth; the image width spans ``view_width_m`` metres, so
  one pixel is ``view_width_m / W`` metres wide (``ImageTextSample.pixel_size``);
- background: a floor plane whose depth grows linearly from the bottom row (near) to the top
  row (far); its normal is constant;
- objects stand on the floor at the depth of their lowest row; objects whose silhouettes overlap
  are pushed apart in depth so that the nearer one is nearer at every pixel (painter's order and
  a per-pixel z-test agree); an object less than ``min_visible_fraction`` visible is dropped;
- normals: unit vectors in camera axes x = image right, y = image up, z = towards the camera
  (so every visible surface has z > 0); for a depth map d(X, Y) in metres they equal
  normalise(dd/dX, dd/dY, 1);
- shading: Lambertian with light from the top left, so curved objects show their normals.

Geometry is drawn in resolution-free units (fractions of the image), so sample ``i`` shows the
same scene at 224 and at 448 pixels.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from tipstorch.data.sample import ImageTextSample
from tipstorch.data.scene_captions import SceneCaptioner
from tipstorch.data.streams import consumer_slot

SHAPES: tuple[str, ...] = ("circle", "ellipse", "ring", "crescent", "square", "triangle", "star", "cross")
CURVED_SHAPES: frozenset[str] = frozenset({"circle", "ellipse", "ring", "crescent"})
OBJECT_TEXTURES: tuple[str, ...] = ("plain", "striped", "checkered", "dotted")
FLOOR_TEXTURES: tuple[str, ...] = ("plain", "striped", "checkered", "mottled")
SIZE_WORDS: tuple[str, ...] = ("small", "medium", "large")


@dataclass(frozen=True)
class NamedColour:
    """A colour with the basic word synthetic captions use and a finer shade only alt-text uses."""

    name: str
    shade: str
    rgb: tuple[float, float, float]


OBJECT_COLOURS: tuple[NamedColour, ...] = (
    NamedColour("red", "crimson", (0.72, 0.06, 0.10)),
    NamedColour("red", "scarlet", (0.96, 0.16, 0.10)),
    NamedColour("orange", "amber", (0.98, 0.58, 0.06)),
    NamedColour("orange", "tangerine", (0.95, 0.43, 0.04)),
    NamedColour("yellow", "lemon", (0.98, 0.93, 0.16)),
    NamedColour("yellow", "mustard", (0.84, 0.73, 0.08)),
    NamedColour("green", "lime", (0.45, 0.86, 0.14)),
    NamedColour("green", "emerald", (0.04, 0.62, 0.30)),
    NamedColour("blue", "navy", (0.08, 0.16, 0.62)),
    NamedColour("blue", "azure", (0.14, 0.50, 0.96)),
    NamedColour("purple", "violet", (0.56, 0.26, 0.88)),
    NamedColour("purple", "plum", (0.46, 0.10, 0.48)),
    NamedColour("pink", "rose", (0.98, 0.46, 0.66)),
    NamedColour("pink", "magenta", (0.92, 0.14, 0.66)),
    NamedColour("brown", "chocolate", (0.42, 0.22, 0.08)),
    NamedColour("brown", "sienna", (0.62, 0.32, 0.16)),
)

FLOOR_COLOURS: tuple[tuple[str, tuple[float, float, float]], ...] = (
    ("light gray", (0.74, 0.74, 0.74)),
    ("dark gray", (0.30, 0.30, 0.32)),
    ("beige", (0.86, 0.80, 0.66)),
    ("cream", (0.95, 0.93, 0.84)),
    ("slate", (0.40, 0.47, 0.56)),
    ("sand", (0.80, 0.70, 0.50)),
    ("sage", (0.62, 0.70, 0.58)),
)

# Light direction in camera axes (x right, y up, z towards the camera): from the top left, front.
_LIGHT = np.array([-0.45, 0.55, 0.70], dtype=np.float32) / np.float32(math.sqrt(0.45**2 + 0.55**2 + 0.70**2))
_AMBIENT = 0.35
_ELLIPSE_MINOR = 0.55  # minor semi-axis of the ellipse (major = 1), aspect 1.8
_ELLIPSOID_HEIGHT = 0.55  # relief of the ellipse as a fraction of its major semi-axis
_RING_CENTRE, _RING_TUBE = 0.775, 0.225  # torus: tube centre radius and tube radius
_NORMAL_Z_FLOOR = 0.05  # keeps silhouette normals camera-facing (z > 0)
_DEPTH_MARGIN_M = 0.05  # clearance between overlapping objects and between objects and the floor
_NEAREST_DEPTH_M = 0.5  # objects pulled forward nearer than this are left out


@dataclass(frozen=True)
class ScenesConfig:
    """How scenes are drawn. All lengths except ``view_width_m`` are resolution-free.

    image_size: side of square images, or (H, W).
    min_objects / max_objects: how many objects are drawn; an object hidden by nearer ones beyond
        ``min_visible_fraction`` is left out, so a scene may show fewer.
    object_radius: range of object radii as fractions of the short image side.
    min_visible_fraction: objects less visible than this (after occlusion) are left out.
    view_width_m: metres spanned by the image width (orthographic camera).
    floor_depth_top / floor_depth_bottom: ranges of the floor depth (m) at the top / bottom rows.
    alt_wrong_colour_prob: probability that the alt-text names a wrong colour.
    """

    image_size: int | tuple[int, int] = 224
    seed: int = 0
    min_objects: int = 1
    max_objects: int = 4
    object_radius: tuple[float, float] = (0.08, 0.22)
    min_visible_fraction: float = 0.5
    view_width_m: float = 4.0
    floor_depth_top: tuple[float, float] = (9.0, 11.0)
    floor_depth_bottom: tuple[float, float] = (5.0, 7.0)
    alt_wrong_colour_prob: float = 0.15

    def __post_init__(self) -> None:
        height, width = self.size
        if min(height, width) < 16:
            raise ValueError(f"ScenesConfig.image_size must be at least 16 pixels, got {self.image_size}")
        if not 1 <= self.min_objects <= self.max_objects <= 8:
            raise ValueError(
                f"ScenesConfig needs 1 <= min_objects <= max_objects <= 8, got {self.min_objects}, {self.max_objects}"
            )
        low, high = self.object_radius
        if not 0.0 < low <= high <= 0.5:
            raise ValueError(
                f"ScenesConfig.object_radius must satisfy 0 < low <= high <= 0.5, got {self.object_radius}"
            )
        if not 0.0 <= self.min_visible_fraction <= 1.0:
            raise ValueError(
                f"ScenesConfig.min_visible_fraction must be in [0, 1], got {self.min_visible_fraction}"
            )
        if max(self.floor_depth_bottom) >= min(self.floor_depth_top):
            raise ValueError(
                "ScenesConfig: the floor must be farther at the top (floor_depth_top > floor_depth_bottom)"
            )

    @property
    def size(self) -> tuple[int, int]:
        """(H, W) in pixels."""
        if isinstance(self.image_size, int):
            return self.image_size, self.image_size
        height, width = self.image_size
        return int(height), int(width)


@dataclass
class SceneObject:
    """One visible object: what the captions say about it and where it is.

    centroid: (x, y) in pixels, mean of the visible pixels (column, row indices).
    position: (row word, column word) of the centroid in a 3x3 grid: top/middle/bottom, left/centre/right.
    depth_range: (nearest, farthest) depth in metres of the visible surface.
    occludes: instance ids of the objects this one hides in part (it is in front of them).
    """

    instance_id: int
    shape: str
    colour: NamedColour
    texture: str
    size: str
    centroid: tuple[float, float]
    position: tuple[str, str]
    depth_range: tuple[float, float]
    visible_fraction: float
    visible_pixels: int
    occludes: tuple[int, ...] = ()


@dataclass
class _Placed:
    """An object drawn into its bounding box: box (y0, y1, x0, x1) and per-pixel crops."""

    shape: str
    colour: NamedColour
    texture: str
    radius: float  # pixels
    box: tuple[int, int, int, int]
    inside: np.ndarray  # bool [h, w]
    height: np.ndarray  # float32 [h, w], relief towards the camera in units of radius
    normals: np.ndarray  # float32 [h, w, 3]
    albedo: np.ndarray  # float32 [h, w, 3], colour x texture
    relief_range: tuple[float, float]  # (lowest, highest) height over the silhouette
    base_row: int  # lowest image row of the silhouette, where the object stands on the floor
    depth: float = 0.0  # reference depth (m); surface depth = depth - radius_m * height
    visible: np.ndarray | None = None
    hides: list[_Placed] = field(default_factory=list)  # farther objects whose silhouettes it overlaps


def _shape_relief(shape: str, p: np.ndarray, q: np.ndarray, tilt: tuple[float, float]):
    """Silhouette, relief and local normal of a unit-radius shape at local coordinates (p, q).

    p, q: float32 [h, w], object axes (q points down the image before rotation).
    Returns inside bool [h, w], height float32 [h, w] (towards the camera, in radii) and the
    unnormalised normal (n_p, n_q, n_z) in the same local axes (n_q points down).
    """
    rr = p * p + q * q
    if shape in ("circle", "crescent"):
        inside = rr <= 1.0
        if shape == "crescent":
            inside &= (p - 0.45) ** 2 + q * q >= 0.8**2
        s = np.sqrt(np.clip(1.0 - rr, 0.0, None))
        return inside, s, (p, q, np.maximum(s, _NORMAL_Z_FLOOR))
    if shape == "ellipse":
        b2 = _ELLIPSE_MINOR**2
        core = 1.0 - p * p - q * q / b2
        s = np.sqrt(np.clip(core, 0.0, None))
        c = _ELLIPSOID_HEIGHT
        return core >= 0.0, c * s, (c * p, c * q / b2, np.maximum(s, _NORMAL_Z_FLOOR))
    if shape == "ring":
        rho = np.sqrt(rr)
        offset = rho - _RING_CENTRE
        s = np.sqrt(np.clip(_RING_TUBE**2 - offset * offset, 0.0, None))
        radial = offset / np.maximum(rho, 1e-6)
        return (
            np.abs(offset) <= _RING_TUBE,
            s,
            (radial * p, radial * q, np.maximum(s, _NORMAL_Z_FLOOR * _RING_TUBE)),
        )
    if shape == "square":
        inside = (np.abs(p) <= 0.75) & (np.abs(q) <= 0.75)
    elif shape == "triangle":  # equilateral, vertex up, inscribed in the unit circle
        inside = (q <= 0.5) & (0.866 * p - 0.5 * q <= 0.5) & (-0.866 * p - 0.5 * q <= 0.5)
    elif shape == "star":  # five points, inner radius 0.45
        inside = _inside_star(p, q, inner=0.45)
    elif shape == "cross":
        ap, aq = np.abs(p), np.abs(q)
        inside = ((ap <= 0.3) & (aq <= 0.9)) | ((aq <= 0.3) & (ap <= 0.9))
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    a, b = tilt  # flat shapes are tilted planes: height = a p + b q
    height = (a * p + b * q).astype(np.float32)
    ones = np.ones_like(p)
    return inside, height, (-a * ones, -b * ones, ones)


def _inside_star(p: np.ndarray, q: np.ndarray, inner: float) -> np.ndarray:
    """Point-in-pentagram test, vectorised: fold the angle into one half-spike and test one edge."""
    angle = np.arctan2(p, -q)  # 0 at the top point, so the star points up
    sector = 2.0 * math.pi / 5.0
    folded = np.abs((angle + sector / 2.0) % sector - sector / 2.0)
    r = np.sqrt(p * p + q * q)
    x, y = r * np.cos(folded), r * np.sin(folded)
    # edge from the outer vertex (1, 0) to the inner vertex at half a sector
    ix, iy = inner * math.cos(sector / 2.0), inner * math.sin(sector / 2.0)
    cross = (ix - 1.0) * y - iy * (x - 1.0)
    return cross >= 0.0  # same side of the edge as the centre


def _object_albedo(texture: str, rgb: tuple[float, float, float], p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Colour x texture in object coordinates (the pattern turns with the object): [h, w, 3]."""
    if texture == "plain":
        factor = np.ones_like(p)
    elif texture == "striped":
        factor = np.where(np.sin(2.0 * math.pi * 2.5 * p) > 0.0, 1.0, 0.62)
    elif texture == "checkered":
        factor = np.where((np.floor(p * 2.5) + np.floor(q * 2.5)) % 2 == 0, 1.0, 0.62)
    elif texture == "dotted":
        fp, fq = (p * 3.0) % 1.0 - 0.5, (q * 3.0) % 1.0 - 0.5
        factor = np.where(fp * fp + fq * fq < 0.08, 0.6, 1.0)
    else:
        raise ValueError(f"unknown texture {texture!r}; expected one of {OBJECT_TEXTURES}")
    return factor.astype(np.float32)[..., None] * np.asarray(rgb, dtype=np.float32)


def _value_noise(rng: np.random.Generator, cells: int, height: int, width: int) -> np.ndarray:
    """Smooth noise in [0, 1], float32 [H, W]: a cells x cells random grid upsampled bilinearly."""
    grid = rng.random((cells, cells), dtype=np.float32)
    return np.asarray(Image.fromarray(grid, mode="F").resize((width, height), Image.BILINEAR))


class ScenesDataset(torch.utils.data.Dataset):
    """Seeded procedural scenes: ``ds[i]`` (or ``ds.sample(i)`` for any i >= 0) is a ImageTextSample
    that depends only on (config, i). ``length=None`` means unbounded: use ``sample(i)`` or
    ``ScenesStream`` (``len`` then raises).
    """

    class_names: list[str] = ["background", *SHAPES]
    label_names: list[str] = list(SHAPES)

    def __init__(self, config: ScenesConfig | None = None, length: int | None = None) -> None:
        self.config = config or ScenesConfig()
        if length is not None and length < 0:
            raise ValueError(f"ScenesDataset length must be >= 0 or None, got {length}")
        self.length = length
        self.captioner = SceneCaptioner(OBJECT_COLOURS, wrong_colour_prob=self.config.alt_wrong_colour_prob)

    def __len__(self) -> int:
        if self.length is None:
            raise TypeError("ScenesDataset(length=None) is unbounded; use .sample(i) or ScenesStream")
        return self.length

    def __getitem__(self, index: int) -> ImageTextSample:
        if self.length is not None and not -self.length <= index < self.length:
            raise IndexError(f"ScenesDataset index {index} out of range for length {self.length}")
        return self.sample(index % self.length if self.length else index)

    def sample(self, index: int) -> ImageTextSample:
        """Draw scene ``index`` (any int >= 0)."""
        if index < 0:
            raise IndexError(f"ScenesDataset.sample needs index >= 0, got {index}")
        cfg = self.config
        rng = np.random.default_rng([cfg.seed, index])
        height, width = cfg.size
        pixel_size = cfg.view_width_m / width

        floor = _draw_floor(rng, height, width, pixel_size, cfg)
        placed = _draw_objects(rng, height, width, cfg)
        placed = _assign_depths(placed, floor["row_depth"], pixel_size)
        placed = _resolve_occlusion(placed, height, width, cfg.min_visible_fraction)

        image = floor["image"]
        depth = np.repeat(floor["row_depth"][:, None], width, axis=1)
        normals = np.broadcast_to(floor["normal"], (height, width, 3)).copy()
        class_mask = np.zeros((height, width), dtype=np.int64)
        instance_mask = np.zeros((height, width), dtype=np.int64)
        objects: list[SceneObject] = []
        ids = {id(obj): instance_id for instance_id, obj in enumerate(placed, start=1)}
        for instance_id, obj in enumerate(placed, start=1):
            y0, y1, x0, x1 = obj.box
            vis = obj.visible
            radius_m = obj.radius * pixel_size
            surface = (obj.depth - radius_m * obj.height).astype(np.float32)
            shade = _AMBIENT + (1.0 - _AMBIENT) * np.clip(obj.normals @ _LIGHT, 0.0, 1.0)
            image[y0:y1, x0:x1][vis] = (obj.albedo * shade[..., None])[vis]
            depth[y0:y1, x0:x1][vis] = surface[vis]
            normals[y0:y1, x0:x1][vis] = obj.normals[vis]
            class_mask[y0:y1, x0:x1][vis] = SHAPES.index(obj.shape) + 1
            instance_mask[y0:y1, x0:x1][vis] = instance_id
            occludes = tuple(sorted(ids[id(hidden)] for hidden in obj.hides if id(hidden) in ids))
            objects.append(_describe(obj, instance_id, surface, occludes, height, width, cfg))

        pixels = np.clip(image * 255.0 + 0.5, 0, 255).astype(np.uint8)
        captions = self.captioner(objects, floor["name"], floor["texture"], (height, width), rng)
        return ImageTextSample(
            image=Image.fromarray(pixels, mode="RGB"),
            captions=captions,
            class_mask=class_mask,
            instance_mask=instance_mask,
            depth=depth,
            normals=normals,
            label=SHAPES.index(objects[0].shape),
            key=f"scenes-{cfg.seed}-{index}",
            pixel_size=pixel_size,
            objects=objects,
        )


class ScenesStream(torch.utils.data.IterableDataset):
    """Unbounded stream of scenes for DataLoaders: consumer c of n (rank x worker) yields scenes
    start + c, start + c + n, ... so ranks and workers never repeat each other's samples.

    rank, world_size: default to torch.distributed when initialised, else (0, 1).
    """

    def __init__(
        self,
        config: ScenesConfig | None = None,
        start: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        self.dataset = ScenesDataset(config)
        self.start, self.rank, self.world_size = start, rank, world_size

    def __iter__(self) -> Iterator[ImageTextSample]:
        slot, slots = consumer_slot(self.rank, self.world_size)
        index = self.start + slot
        while True:
            yield self.dataset.sample(index)
            index += slots


def _draw_floor(
    rng: np.random.Generator, height: int, width: int, pixel_size: float, cfg: ScenesConfig
) -> dict:
    """Floor plane: image float32 [H, W, 3], row_depth float32 [H] (m), normal float32 [3]."""
    name, rgb = FLOOR_COLOURS[rng.integers(len(FLOOR_COLOURS))]
    texture = FLOOR_TEXTURES[rng.integers(len(FLOOR_TEXTURES))]
    depth_top = rng.uniform(*cfg.floor_depth_top)
    depth_bottom = rng.uniform(*cfg.floor_depth_bottom)
    rows = (np.arange(height, dtype=np.float32) + 0.5) / height
    row_depth = (depth_top + (depth_bottom - depth_top) * rows).astype(np.float32)
    # d(Y) with Y up in metres: dd/dY = (depth_top - depth_bottom) / (H * pixel_size)
    slope = (depth_top - depth_bottom) / (height * pixel_size)
    normal = np.array([0.0, slope, 1.0], dtype=np.float32) / np.float32(math.hypot(slope, 1.0))

    inverse_depth = (1.0 / row_depth)[:, None]  # pattern cells shrink with distance
    cols = ((np.arange(width, dtype=np.float32) + 0.5) / width - 0.5)[None, :]
    pattern = np.ones((height, width), dtype=np.float32)
    if texture == "striped":
        pattern = np.where(np.sin(2.0 * math.pi * 45.0 * inverse_depth) > 0.0, 1.0, 0.8) * pattern
    elif texture == "checkered":
        cells = np.floor(40.0 * inverse_depth) + np.floor(cols * 60.0 * inverse_depth)
        pattern = np.where(cells % 2 == 0, 1.0, 0.78).astype(np.float32)
    elif texture == "mottled":
        pattern = 0.7 + 0.6 * _value_noise(rng, 12, height, width) * _value_noise(rng, 5, height, width)
    grain = 0.94 + 0.12 * _value_noise(rng, 8, height, width)
    fog = (1.05 - 0.3 * (row_depth - depth_bottom) / (depth_top - depth_bottom))[:, None]
    brightness = (pattern * grain * fog)[..., None]
    image = np.clip(brightness * np.asarray(rgb, dtype=np.float32), 0.0, 1.0).astype(np.float32)
    return {"image": image, "row_depth": row_depth, "normal": normal, "name": name, "texture": texture}


def _draw_objects(rng: np.random.Generator, height: int, width: int, cfg: ScenesConfig) -> list[_Placed]:
    """Sample objects with distinct (colour word, shape) pairs and render each into its box."""
    unit = min(height, width)
    count = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    used: set[tuple[str, str]] = set()
    pairs = len(SHAPES) * len({c.name for c in OBJECT_COLOURS})
    placed: list[_Placed] = []
    while len(placed) < count and len(used) < pairs:
        shape = SHAPES[rng.integers(len(SHAPES))]
        colour = OBJECT_COLOURS[rng.integers(len(OBJECT_COLOURS))]
        if (colour.name, shape) in used:
            continue
        used.add((colour.name, shape))
        texture = OBJECT_TEXTURES[rng.integers(len(OBJECT_TEXTURES))]
        radius = max(float(rng.uniform(*cfg.object_radius)) * unit, 3.0)
        cx = rng.uniform(radius, width - radius)
        cy = rng.uniform(radius, height - radius)
        angle = 0.0 if shape in ("circle", "ring") else rng.uniform(0.0, 2.0 * math.pi)
        tilt = (float(rng.uniform(-0.3, 0.3)), float(rng.uniform(-0.3, 0.3)))

        x0, x1 = max(int(math.floor(cx - radius)), 0), min(int(math.ceil(cx + radius)) + 1, width)
        y0, y1 = max(int(math.floor(cy - radius)), 0), min(int(math.ceil(cy + radius)) + 1, height)
        dx = ((np.arange(x0, x1, dtype=np.float32) + 0.5 - cx) / radius)[None, :]
        dy = ((np.arange(y0, y1, dtype=np.float32) + 0.5 - cy) / radius)[:, None]
        cos, sin = np.float32(math.cos(angle)), np.float32(math.sin(angle))
        p = cos * dx + sin * dy
        q = -sin * dx + cos * dy
        inside, relief, (n_p, n_q, n_z) = _shape_relief(shape, p, q, tilt)
        if not inside.any():
            continue
        # local axes -> camera axes (x right, y up)
        n_x = cos * n_p - sin * n_q
        n_y = -(sin * n_p + cos * n_q)
        normals = np.stack(np.broadcast_arrays(n_x, n_y, n_z), axis=-1).astype(np.float32)
        normals /= np.linalg.norm(normals, axis=-1, keepdims=True)
        placed.append(
            _Placed(
                shape=shape,
                colour=colour,
                texture=texture,
                radius=radius,
                box=(y0, y1, x0, x1),
                inside=inside,
                height=np.asarray(relief, dtype=np.float32),
                normals=normals,
                albedo=_object_albedo(texture, colour.rgb, p, q),
                relief_range=(float(relief[inside].min()), float(relief[inside].max())),
                base_row=y0 + int(np.flatnonzero(inside.any(axis=1))[-1]),
            )
        )
    return placed


def _overlap(a: _Placed, b: _Placed) -> int:
    """Number of pixels where the silhouettes of a and b overlap."""
    y0, y1 = max(a.box[0], b.box[0]), min(a.box[1], b.box[1])
    x0, x1 = max(a.box[2], b.box[2]), min(a.box[3], b.box[3])
    if y0 >= y1 or x0 >= x1:
        return 0
    crop_a = a.inside[y0 - a.box[0] : y1 - a.box[0], x0 - a.box[2] : x1 - a.box[2]]
    crop_b = b.inside[y0 - b.box[0] : y1 - b.box[0], x0 - b.box[2] : x1 - b.box[2]]
    return int(np.count_nonzero(crop_a & crop_b))


def _assign_depths(placed: list[_Placed], row_depth: np.ndarray, pixel_size: float) -> list[_Placed]:
    """Stand each object on the floor at its lowest row, then pull nearer objects forward until
    every overlapping pair is separated in depth (recording in ``hides`` which farther objects each
    one overlaps). Returns objects sorted far -> near; objects that would come closer than
    _NEAREST_DEPTH_M are dropped."""
    for obj in placed:
        lowest = obj.relief_range[0]  # negative relief (tilted planes) reaches behind the reference depth
        obj.depth = (
            float(row_depth[obj.base_row]) - obj.radius * pixel_size * max(0.0, -lowest) - _DEPTH_MARGIN_M
        )
    kept: list[_Placed] = []
    for obj in sorted(placed, key=lambda o: -o.depth):
        radius_m = obj.radius * pixel_size
        lowest, highest = obj.relief_range
        for farther in kept:
            if _overlap(obj, farther):
                obj.hides.append(farther)
                farther_front = farther.depth - farther.radius * pixel_size * farther.relief_range[1]
                obj.depth = min(obj.depth, farther_front - _DEPTH_MARGIN_M + radius_m * lowest)
        if obj.depth - radius_m * highest >= _NEAREST_DEPTH_M:
            kept.append(obj)
    return kept


def _resolve_occlusion(placed: list[_Placed], height: int, width: int, min_visible: float) -> list[_Placed]:
    """Paint near -> far; keep objects at least ``min_visible`` visible. Returns the kept objects
    ordered by visible pixel count (largest first), each with its ``visible`` mask."""
    occupied = np.zeros((height, width), dtype=bool)
    kept: list[_Placed] = []
    for obj in reversed(placed):  # nearest first
        y0, y1, x0, x1 = obj.box
        region = occupied[y0:y1, x0:x1]
        visible = obj.inside & ~region
        if np.count_nonzero(visible) < min_visible * np.count_nonzero(obj.inside) or not visible.any():
            continue
        region |= obj.inside
        obj.visible = visible
        kept.append(obj)
    return sorted(kept, key=lambda o: -int(np.count_nonzero(o.visible)))


def _third(fraction: float) -> int:
    """0, 1 or 2: which third of the image a pixel-centre coordinate (fraction of the side) is in;
    boundaries go to the middle third so that mirroring maps left and right thirds onto each other."""
    offset = fraction - 0.5
    return 0 if offset < -1 / 6 else 2 if offset > 1 / 6 else 1


def _describe(
    obj: _Placed,
    instance_id: int,
    surface: np.ndarray,
    occludes: tuple[int, ...],
    height: int,
    width: int,
    cfg: ScenesConfig,
) -> SceneObject:
    """Caption-facing facts about one rendered object (centroid of its visible pixels)."""
    ys, xs = np.nonzero(obj.visible)
    cx, cy = float(xs.mean()) + obj.box[2], float(ys.mean()) + obj.box[0]
    row = ("top", "middle", "bottom")[_third((cy + 0.5) / height)]
    col = ("left", "centre", "right")[_third((cx + 0.5) / width)]
    low, high = cfg.object_radius
    relative = (obj.radius / min(height, width) - low) / max(high - low, 1e-9)
    size = SIZE_WORDS[min(int(relative * 3), 2)]
    visible_surface = surface[obj.visible]
    return SceneObject(
        instance_id=instance_id,
        shape=obj.shape,
        colour=obj.colour,
        texture=obj.texture,
        size=size,
        centroid=(cx, cy),
        position=(row, col),
        depth_range=(float(visible_surface.min()), float(visible_surface.max())),
        visible_fraction=float(len(xs) / np.count_nonzero(obj.inside)),
        visible_pixels=len(xs),
        occludes=occludes,
    )
