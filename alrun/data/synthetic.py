"""The embedded default dataset: seeded synthetic shape-detection images.

Designed so acquisition strategies can actually differ: classes are imbalanced
(50/25/15/10 %), objects range from 8 to 48 px with varied aspect ratios, overlap (occlusion),
and sit on noisy, cluttered backgrounds with unlabelled distractor strokes.

``domain`` shifts the image style while keeping the same classes and geometry, so a source
and a shifted target exist for domain adaptation and synthetic pre-training:

* ``source``: light noisy background, saturated colours;
* ``target``: dark striped texture, hue-rotated low-contrast colours, slight blur.

Images are materialised once as PNG + COCO JSON under a cache dir keyed by every parameter,
then read back through the COCO reader like any other dataset.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from alrun.data.dataset import (
    DEFAULT_SPLIT_SEED,
    DatasetSplits,
    DetectionDataset,
    ImageRecord,
    with_fields,
)
from alrun.errors import DatasetError
from alrun.params import NonNegativeInt, PositiveInt, Range

CLASSES = ("circle", "rectangle", "triangle", "cross")
CLASS_FREQ = (0.50, 0.25, 0.15, 0.10)
DOMAINS = ("source", "target")
_VERSION = 1  # bump when the generator changes, so caches are rebuilt


def default_cache_dir() -> Path:
    """``$ALRUN_CACHE`` or ``~/.cache/alrun`` (never inside the repo or shared/)."""
    return Path(os.environ.get("ALRUN_CACHE", Path.home() / ".cache" / "alrun"))


def _background(rng: np.random.Generator, size: int, domain: str) -> np.ndarray:
    if domain == "source":
        base = rng.uniform(150, 230, size=3)
        img = base + rng.normal(0, 18, size=(size, size, 3))
        # low-frequency blotches
        coarse = rng.normal(0, 25, size=(size // 16 + 1, size // 16 + 1, 1))
        img += np.kron(coarse, np.ones((16, 16, 1)))[:size, :size]
    else:
        base = rng.uniform(30, 80, size=3)
        yy, xx = np.mgrid[0:size, 0:size]
        period = rng.uniform(6, 14)
        angle = rng.uniform(0, np.pi)
        stripes = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period)
        img = base + 22 * stripes[..., None] + rng.normal(0, 10, size=(size, size, 3))
    return np.clip(img, 0, 255)


def _colour(rng: np.random.Generator, domain: str) -> tuple[int, int, int]:
    if domain == "source":
        c = rng.uniform(0, 255, size=3)
        c[rng.integers(3)] = rng.uniform(0, 60)  # saturated
    else:
        c = rng.uniform(90, 170, size=3)  # low contrast against the dark texture
        c = np.roll(c, 1)
    return tuple(int(v) for v in c)


def _draw_object(draw: ImageDraw.ImageDraw, cls: int, box: tuple[float, ...], fill) -> None:
    x1, y1, x2, y2 = box
    if cls == 0:
        draw.ellipse(box, fill=fill)
    elif cls == 1:
        draw.rectangle(box, fill=fill)
    elif cls == 2:
        draw.polygon([((x1 + x2) / 2, y1), (x2, y2), (x1, y2)], fill=fill)
    else:
        w, h = x2 - x1, y2 - y1
        tw, th = max(w / 3, 1), max(h / 3, 1)
        draw.rectangle((x1 + (w - tw) / 2, y1, x1 + (w + tw) / 2, y2), fill=fill)
        draw.rectangle((x1, y1 + (h - th) / 2, x2, y1 + (h + th) / 2), fill=fill)


def _clutter(draw: ImageDraw.ImageDraw, rng: np.random.Generator, size: int, domain: str) -> None:
    """Unlabelled distractors: thin strokes and small hollow arcs."""
    for _ in range(rng.integers(2, 7)):
        pts = rng.uniform(0, size, size=4)
        draw.line(list(pts), fill=_colour(rng, domain), width=int(rng.integers(1, 3)))
    for _ in range(rng.integers(0, 3)):
        cx, cy = rng.uniform(0, size, size=2)
        r = rng.uniform(3, 9)
        draw.arc(
            (cx - r, cy - r, cx + r, cy + r),
            0,
            int(rng.integers(90, 300)),
            fill=_colour(rng, domain),
            width=1,
        )


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def render_image(
    rng: np.random.Generator, size: int, domain: str, min_size: int = 8, max_size: int = 48
) -> tuple[Image.Image, np.ndarray, np.ndarray]:
    """One image: (PIL image, boxes (N,4) xyxy float32, labels (N,) int64)."""
    img = Image.fromarray(_background(rng, size, domain).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    _clutter(draw, rng, size, domain)
    boxes: list[np.ndarray] = []
    labels: list[int] = []
    for _ in range(int(rng.integers(1, 6))):
        cls = int(rng.choice(len(CLASSES), p=CLASS_FREQ))
        for _attempt in range(10):
            scale = float(np.exp(rng.uniform(np.log(min_size), np.log(max_size))))
            aspect = float(np.exp(rng.uniform(np.log(0.6), np.log(1.6))))
            w, h = scale * np.sqrt(aspect), scale / np.sqrt(aspect)
            w, h = min(w, size - 2), min(h, size - 2)
            x1, y1 = rng.uniform(0, size - w), rng.uniform(0, size - h)
            box = np.array([x1, y1, x1 + w, y1 + h], dtype=np.float32)
            if all(_iou(box, other) < 0.35 for other in boxes):  # partial occlusion only
                break
        else:
            continue
        _draw_object(draw, cls, tuple(float(v) for v in box), _colour(rng, domain))
        boxes.append(box)
        labels.append(cls)
    if domain == "target":
        img = img.filter(ImageFilter.GaussianBlur(0.6))
    return (
        img,
        np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
        np.asarray(labels, dtype=np.int64),
    )


def _params_key(**params) -> str:
    blob = json.dumps({"version": _VERSION, **params}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def materialise(
    num_images: int, image_size: int, domain: str, data_seed: int, split: str, cache_dir: Path
) -> Path:
    """Write PNGs + ``annotations.json`` once; return the folder. Atomic: build in a temp dir."""
    from alrun.data.coco import write_coco

    key = _params_key(n=num_images, size=image_size, domain=domain, seed=data_seed, split=split)
    target = cache_dir / "synthetic" / f"{domain}-{split}-{key}"
    if (target / "annotations.json").exists():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    (cache_dir / "synthetic").mkdir(exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache_dir / "synthetic", prefix=".tmp-"))
    # the split name is mixed into the seed so pool and test images differ
    seed_seq = np.random.SeedSequence([data_seed, DOMAINS.index(domain), split == "test"])
    rng = np.random.default_rng(seed_seq)
    records = []
    for i in range(num_images):
        img, boxes, labels = render_image(rng, image_size, domain)
        image_id = f"{domain}_{split}_{i:05d}"
        img.save(tmp / f"{image_id}.png")
        # recorded at its final place: the folder is renamed into place below
        final = target / f"{image_id}.png"
        records.append(ImageRecord(image_id, final, image_size, image_size, boxes, labels, domain))
    write_coco(
        DetectionDataset(f"synthetic-{domain}", CLASSES, tuple(records)), tmp / "annotations.json"
    )
    try:
        os.replace(tmp, target)
    except OSError:  # another process won the race; use its copy
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def synthetic_dataset(
    num_images: int,
    image_size: int = 128,
    domain: str = "source",
    data_seed: int = 0,
    split: str = "pool",
    cache_dir: str | Path | None = None,
) -> DetectionDataset:
    from alrun.data.coco import read_coco

    if domain not in DOMAINS:
        raise DatasetError(f"dataset.domain: expected one of {DOMAINS}, got '{domain}'")
    if not 32 <= image_size <= 1024:
        raise DatasetError(f"dataset.image_size: expected 32..1024, got {image_size}")
    if num_images <= 0:
        raise DatasetError(f"dataset: number of {split} images must be > 0, got {num_images}")
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    folder = materialise(num_images, image_size, domain, data_seed, split, cache)
    dataset = read_coco(folder / "annotations.json", image_dir=folder, name=f"synthetic-{domain}")
    return DetectionDataset(
        f"synthetic-{domain}-{split}",
        dataset.classes,
        tuple(_with_domain(rec, domain) for rec in dataset.images),
    )


def _with_domain(rec: ImageRecord, domain: str) -> ImageRecord:
    return with_fields(rec, domain=domain)


def _capped(number: int, cap: int | None, key: str) -> int:
    if cap is None:
        return number
    if isinstance(cap, bool) or not isinstance(cap, int) or cap <= 0:
        raise DatasetError(f"dataset.{key}: expected a positive integer or null, got {cap!r}")
    return min(number, cap)


def synthetic_splits(
    num_pool: PositiveInt = 600,
    num_test: PositiveInt = 200,
    image_size: Annotated[int, Range(32, 1024)] = 128,
    domain: Literal[DOMAINS] = "source",
    data_seed: NonNegativeInt = 0,
    cache_dir: str | Path | None = None,
    max_pool_images: PositiveInt | None = None,
    max_test_images: PositiveInt | None = None,
    split_seed: NonNegativeInt = DEFAULT_SPLIT_SEED,
) -> DatasetSplits:
    """Pool and test splits of the synthetic default (``data_seed`` fixes the images themselves;
    the run's ``seed`` fixes the initial set, training and selection).

    ``max_pool_images`` / ``max_test_images`` (the generic subset keys of every dataset) cap the
    number generated: images are drawn independently from one seeded stream, so the first k are
    already a random sample, the same k images a larger run starts with. ``split_seed`` is
    accepted for uniformity and unused: the images come from ``data_seed``.
    """
    del split_seed
    n_pool = _capped(num_pool, max_pool_images, "max_pool_images")
    n_test = _capped(num_test, max_test_images, "max_test_images")
    return DatasetSplits(
        pool=synthetic_dataset(n_pool, image_size, domain, data_seed, "pool", cache_dir),
        test=synthetic_dataset(n_test, image_size, domain, data_seed, "test", cache_dir),
    )
