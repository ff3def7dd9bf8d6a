"""What every reader checks alike: corrupt images at load time, EXIF orientation, root paths."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from alrun.data.coco import read_coco
from alrun.data.images import load_image
from alrun.data.validate import read_image_size, resolve_root
from alrun.data.voc import read_voc
from alrun.data.yolo import read_yolo
from alrun.errors import DatasetError
from tests.data.builders import OBJECTS, make_coco, make_voc, make_yolo


def _corrupt_coco(root: Path) -> tuple[Path, object]:
    file = make_coco(root)
    (root / "images" / "im03.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage, no header")
    return root / "images" / "im03.png", lambda skip: read_coco(file, skip_invalid=skip)


def _corrupt_voc(root: Path) -> tuple[Path, object]:
    make_voc(root, split_files=False)
    (root / "JPEGImages" / "im03.jpg").write_bytes(b"\xff\xd8\xff truncated")
    return root / "JPEGImages" / "im03.jpg", lambda skip: read_voc(root, skip_invalid=skip)


def _corrupt_yolo(root: Path) -> tuple[Path, object]:
    make_yolo(root)
    (root / "images" / "train" / "im03.png").write_bytes(b"")
    return root / "images" / "train" / "im03.png", lambda skip: read_yolo(root, skip_invalid=skip)


@pytest.mark.parametrize("build", [_corrupt_coco, _corrupt_voc, _corrupt_yolo])
def test_corrupt_image_is_found_at_load_time_and_skipped_alike(tmp_path: Path, build) -> None:
    """COCO and VOC declare sizes, so the old readers never opened the file: a corrupt image
    stopped the run in round 0. Every reader now opens each header when the dataset loads."""
    bad, read = build(tmp_path / "ds")
    with pytest.raises(DatasetError) as err:
        read(False)
    assert f"cannot read image {bad}" in str(err.value) and "\n" not in str(err.value)
    ds = read(True)
    images_in_folder = len(list(bad.parent.iterdir()))
    assert len(ds) == images_in_folder - 1 and bad not in {rec.file for rec in ds.images}
    assert len(ds.skipped) == 1 and f"cannot read image {bad}" in ds.skipped[0]


def _rotated_jpeg(path: Path, stored: tuple[int, int], orientation: int) -> Path:
    """A JPEG stored ``stored`` (w, h) with an EXIF orientation tag, as phones write them.

    Its left half is red in the stored pixels; orientation 6 means "rotate 90 degrees clockwise
    to display", so the red half ends up at the top of the displayed image.
    """
    image = Image.new("RGB", stored, (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, stored[0] // 2, stored[1]))
    exif = Image.Exif()
    exif[0x0112] = orientation
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, exif=exif.tobytes(), quality=95)
    return path


def test_exif_orientation_is_applied_to_sizes_and_pixels(tmp_path: Path) -> None:
    photo = _rotated_jpeg(tmp_path / "images" / "phone.jpg", (40, 30), orientation=6)
    assert read_image_size(photo) == (30, 40)  # displayed: portrait
    ann = {
        "images": [{"id": 1, "file_name": "phone.jpg"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 30, 20, 8]}],
        "categories": [{"id": 1, "name": "cat"}],
    }
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    rec = read_coco(tmp_path / "ann.json", image_dir=tmp_path / "images").images[0]
    assert (rec.width, rec.height) == (30, 40)  # the box at y=30..38 fits only when upright
    pixels = load_image(rec)
    assert tuple(pixels.shape) == (3, 40, 30)
    top, bottom = pixels[:, :15].mean(dim=(1, 2)), pixels[:, 25:].mean(dim=(1, 2))
    assert top[0] > 0.9 and top[2] < 0.1  # red on top, as displayed
    assert bottom[2] > 0.9 and bottom[0] < 0.1
    # a size declared in the stored orientation is a mismatch, and the message says why
    ann["images"][0].update(width=40, height=30)
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    with pytest.raises(DatasetError, match=r"phone\.jpg is 30x40 \(as displayed, EXIF"):
        read_coco(tmp_path / "ann.json", image_dir=tmp_path / "images")


def test_exif_orientation_in_voc_and_yolo_sizes(tmp_path: Path) -> None:
    voc = make_voc(tmp_path / "voc", split_files=False, stems=["im00"])
    _rotated_jpeg(voc / "JPEGImages" / "im00.jpg", (30, 40), orientation=8)
    assert (read_voc(voc).images[0].width, read_voc(voc).images[0].height) == (40, 30)
    yolo = make_yolo(tmp_path / "yolo")
    for stem in OBJECTS:
        if (yolo / "images" / "train" / f"{stem}.png").exists():
            (yolo / "images" / "train" / f"{stem}.png").unlink()
            _rotated_jpeg(yolo / "images" / "train" / f"{stem}.jpg", (30, 40), orientation=6)
    rec = read_yolo(yolo).images[0]
    assert (rec.width, rec.height) == (40, 30)
    np.testing.assert_allclose(rec.boxes, [OBJECTS["im00"][0][1]], atol=1e-4)


def test_relative_root_errors_name_the_absolute_path(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DatasetError) as err:
        resolve_root("../not-here/voc")
    expected = (tmp_path.parent / "not-here" / "voc").resolve()
    assert str(err.value) == f"dataset.root: {expected} does not exist (given as '../not-here/voc')"
    with pytest.raises(DatasetError, match=r"^dataset\.annotation_file: required"):
        resolve_root(None, "dataset.annotation_file")
    assert os.path.isabs(str(resolve_root(".")))


def _truncate(path: Path, keep: float = 0.6) -> Path:
    """Cut a valid image file short: its header still reads, its pixels do not decode (noisy
    pixels, so the compressed data is long enough to cut inside it)."""
    with Image.open(path) as image:
        size, fmt = image.size, image.format
    noise = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(noise).save(path, format=fmt)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def _truncated_voc(root: Path) -> tuple[Path, object]:
    make_voc(root, split_files=False)
    bad = _truncate(root / "JPEGImages" / "im03.jpg")
    return bad, lambda skip: read_voc(root, skip_invalid=skip)


def _truncated_coco(root: Path) -> tuple[Path, object]:
    file = make_coco(root)
    bad = _truncate(root / "images" / "im03.png")
    return bad, lambda skip: read_coco(file, skip_invalid=skip)


@pytest.mark.parametrize("build", [_truncated_voc, _truncated_coco])
def test_truncated_image_is_found_at_load_time_and_skipped(tmp_path: Path, build) -> None:
    """Only headers were read at load: a truncated file passed and stopped round 0 in
    training. Every image is now decoded (JPEG at 1/8 scale) when the dataset loads."""
    bad, read = build(tmp_path / "ds")
    assert read_image_size(bad)  # the header alone does not tell
    with pytest.raises(DatasetError) as err:
        read(False)
    message = str(err.value)
    assert f"cannot read image {bad}" in message and "truncated" in message
    assert "\n" not in message
    ds = read(True)
    assert bad not in {rec.file for rec in ds.images}
    assert len(ds.skipped) == 1 and f"cannot read image {bad}" in ds.skipped[0]
