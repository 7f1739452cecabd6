"""CLEVR-Count-like procedural scenes: count 3-10 flat shapes on a plain background.

A stand-in for CLEVR-Count (which cannot be downloaded here) that keeps what matters for
token-budget methods: most of the image is background, and the label depends on every object.

Scenes: a light grey background (level 200-225, per image) with slight Gaussian noise
(sigma 3 grey levels), and 3-10 objects - circles, squares and triangles (squares and
triangles at random rotations) in eight saturated colours, of random size (bounding radius
about 2.5-6.3 px at 32 px, scaled with the image size). Shapes are drawn with PIL at 4x the output size
and downsampled with a box filter, so edges are antialiased.

Visibility rule: objects may overlap (later ones on top), but every object keeps at least
VISIBLE_FRACTION (40 %) of its own pixels, and at least MIN_VISIBLE_PX output pixels, visible
in the final scene (measured on the 4x object-id map). Objects of the same colour never touch
(centres at least r1 + r2 + 1.5 px apart), so two objects never merge into one blob of a
single colour. Every object lies wholly inside the image, at least 1 px from the border.
Placement is by rejection sampling; a scene that cannot be completed is redrawn.

Labels: the count; class folders "03".."10" so that sorted order is count order (class index
= count - 3). Each image is a function of (seed, split, index) alone; counts cycle through
3..10 with the index, so classes are balanced (to within one image when a split is not a
multiple of 8).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..errors import ConfigError
from .corruptions import atomic_tree, tree_is_complete

COUNTS = tuple(range(3, 11))
CLASSES = tuple(f"{c:02d}" for c in COUNTS)
SHAPES = ("circle", "square", "triangle")
COLOURS = {
    "red": (200, 40, 40), "green": (40, 150, 60), "blue": (40, 70, 200), "yellow": (215, 175, 20),
    "purple": (130, 50, 160), "orange": (235, 120, 30), "cyan": (20, 160, 175), "black": (45, 45, 45),
}
SCALE = 4  # drawn at 4x, then box-downsampled
VISIBLE_FRACTION = 0.4
MIN_VISIBLE_PX = 6.0  # output pixels
RADIUS = (3.0, 5.5)  # size range in output pixels at 32 px, times SHAPE_RADIUS = the bounding radius
SHAPE_RADIUS = {"circle": 0.85, "square": 1.0, "triangle": 1.15}  # similar areas: 2.3, 2.0, 1.7 x size^2
SAME_COLOUR_GAP = 1.5  # output pixels between same-coloured objects
MANIFEST = ".vitbudget-counting.json"
SPLITS = {"train": 0, "test": 1}
VERSION = 1  # bump when the generator's output changes, so cached data sets are rebuilt


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    x: float  # centre, 4x pixels
    y: float
    r: float  # bounding radius, 4x pixels
    angle: float

    def polygon(self) -> list[tuple[float, float]]:
        n = 4 if self.shape == "square" else 3
        return [(self.x + self.r * math.cos(self.angle + 2 * math.pi * k / n),
                 self.y + self.r * math.sin(self.angle + 2 * math.pi * k / n)) for k in range(n)]

    def draw(self, draw: ImageDraw.ImageDraw, fill) -> None:
        if self.shape == "circle":
            draw.ellipse((self.x - self.r, self.y - self.r, self.x + self.r, self.y + self.r), fill=fill)
        else:
            draw.polygon(self.polygon(), fill=fill)


@dataclass
class Scene:
    pixels: np.ndarray  # size x size x 3 uint8
    ids: np.ndarray  # (SCALE*size)^2 int: 0 background, k+1 the k-th object (drawn in order)
    objects: list[Obj]
    areas: np.ndarray  # each object's full area in 4x pixels (as if unoccluded)

    @property
    def count(self) -> int:
        return len(self.objects)

    def visible_fractions(self) -> np.ndarray:
        seen = np.bincount(self.ids.ravel(), minlength=self.count + 1)[1:]
        return seen / self.areas


def _mask(obj: Obj, hi: int) -> np.ndarray:
    img = Image.new("L", (hi, hi), 0)
    obj.draw(ImageDraw.Draw(img), 255)
    return np.asarray(img) > 0


def _random_obj(rng: np.random.Generator, size: int) -> Obj:
    k = size / 32
    shape = SHAPES[rng.integers(len(SHAPES))]
    r = rng.uniform(*RADIUS) * SHAPE_RADIUS[shape] * k * SCALE
    margin = r + 1 * k * SCALE
    hi = size * SCALE
    return Obj(
        shape=shape, colour=list(COLOURS)[rng.integers(len(COLOURS))],
        x=float(rng.uniform(margin, hi - margin)), y=float(rng.uniform(margin, hi - margin)), r=float(r),
        angle=float(rng.uniform(0, 2 * math.pi)),
    )


def render_scene(rng: np.random.Generator, count: int, size: int = 32, max_tries: int = 200) -> Scene:
    """A scene with exactly `count` objects satisfying the visibility rule."""
    if count not in COUNTS:
        raise ConfigError(f"count must be in {COUNTS[0]}..{COUNTS[-1]}, got {count}")
    if size < 16:
        raise ConfigError(f"image size must be at least 16, got {size}")
    hi = size * SCALE
    min_px = MIN_VISIBLE_PX * SCALE * SCALE * (size / 32) ** 2
    gap = SAME_COLOUR_GAP * SCALE * size / 32
    while True:  # a scene that gets stuck is redrawn from scratch (rare)
        objs: list[Obj] = []
        areas: list[float] = []
        ids = np.zeros((hi, hi), np.int16)
        for _ in range(count):
            for _ in range(max_tries):
                obj = _random_obj(rng, size)
                if any(o.colour == obj.colour and math.hypot(o.x - obj.x, o.y - obj.y) < o.r + obj.r + gap for o in objs):
                    continue
                mask = _mask(obj, hi)
                new_ids = ids.copy()
                new_ids[mask] = len(objs) + 1
                new_areas = np.asarray([*areas, mask.sum()], dtype=np.float64)
                seen = np.bincount(new_ids.ravel(), minlength=len(objs) + 2)[1:]
                if np.all(seen >= VISIBLE_FRACTION * new_areas) and np.all(seen >= min_px):
                    objs.append(obj)
                    areas.append(float(mask.sum()))
                    ids = new_ids
                    break
            else:
                break
        if len(objs) == count:
            break
    background = float(rng.uniform(200, 225))
    img = Image.new("RGB", (hi, hi), (round(background),) * 3)
    draw = ImageDraw.Draw(img)
    for obj in objs:
        obj.draw(draw, COLOURS[obj.colour])
    small = np.asarray(img.resize((size, size), Image.BOX), dtype=np.float32)
    noisy = np.clip(np.rint(small + rng.normal(0, 3.0, small.shape)), 0, 255).astype(np.uint8)
    return Scene(noisy, ids, objs, np.asarray(areas))


def count_for(index: int) -> int:
    return COUNTS[index % len(COUNTS)]


def make_scene(seed: int, split: str, index: int, size: int = 32) -> Scene:
    """The scene stored as <split>/<count>/<index>.png: a function of its arguments alone."""
    rng = np.random.default_rng([seed, SPLITS[split], index, VERSION])
    return render_scene(rng, count_for(index), size)


def make_counting(
    out: str | os.PathLike, train: int = 20000, test: int = 2000, size: int = 32, seed: int = 0, progress: bool = False,
) -> Path:
    """Write out/{train,test}/<count>/<index>.png (ImageFolder); reuses a complete identical tree."""
    from tqdm.auto import tqdm

    if train <= 0 or test <= 0:
        raise ConfigError(f"--train and --test must be positive, got {train} and {test}")
    if size < 16:
        raise ConfigError(f"--size must be at least 16, got {size}")
    out = Path(out)
    spec = {"version": VERSION, "train": train, "test": test, "size": size, "seed": seed}
    if tree_is_complete(out, MANIFEST, spec):
        return out
    with atomic_tree(out, MANIFEST, spec, extra={"classes": list(CLASSES)}) as tmp:
        for split, n in (("train", train), ("test", test)):
            for name in CLASSES:
                (tmp / split / name).mkdir(parents=True)
            width = max(5, len(str(n - 1)))
            for i in tqdm(range(n), desc=f"counting {split}", unit="img", disable=not progress):
                scene = make_scene(seed, split, i, size)
                Image.fromarray(scene.pixels).save(tmp / split / f"{scene.count:02d}" / f"{i:0{width}d}.png", format="PNG")
    return out


def channel_stats(root: str | os.PathLike, split: str = "train", limit: int | None = 2000) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std (0-1 scale) over a (deterministic subset of a) split."""
    from .folder import ImageFolder
    from .loader import subset_indices

    ds = ImageFolder(root, split)
    idx = subset_indices(len(ds), limit)
    arr = np.stack([np.asarray(ds[i][0], dtype=np.float64) / 255 for i in idx])
    return tuple(arr.mean(axis=(0, 1, 2)).round(4).tolist()), tuple(arr.std(axis=(0, 1, 2)).round(4).tolist())
