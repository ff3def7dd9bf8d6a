import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from alrun.data.coco import coco_splits, read_coco, write_coco
from alrun.data.dataset import DetectionDataset, ImageRecord
from alrun.errors import DatasetError


def make_image(path: Path, size: tuple[int, int] = (40, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size).save(path)
    return path


def coco_dict(**overrides):
    data = {
        "images": [
            {"id": 2, "file_name": "b.png", "width": 40, "height": 30},
            {"id": 1, "file_name": "a.png", "width": 40, "height": 30},
        ],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 7, "bbox": [1, 2, 10, 5], "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 3, "bbox": [0, 0, 40, 30], "iscrowd": 0},
            {"id": 3, "image_id": 2, "category_id": 7, "bbox": [5, 5, 5, 5]},
            {"id": 4, "image_id": 2, "category_id": 7, "bbox": [0, 0, 9, 9], "iscrowd": 1},
        ],
        "categories": [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}],
    }
    data.update(overrides)
    return data


@pytest.fixture
def coco_dir(tmp_path: Path) -> Path:
    make_image(tmp_path / "a.png")
    make_image(tmp_path / "b.png")
    return tmp_path


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


def test_read_coco_converts_xywh_and_orders_classes_by_category_id(coco_dir: Path) -> None:
    ds = read_coco(write_json(coco_dir / "ann.json", coco_dict()))
    assert ds.classes == ("cat", "dog")
    assert ds.ids == ["1", "2"]
    a, b = ds.images
    assert a.file == coco_dir / "a.png" and (a.width, a.height) == (40, 30)
    np.testing.assert_array_equal(a.boxes, [[1, 2, 11, 7], [0, 0, 40, 30]])
    np.testing.assert_array_equal(a.labels, [1, 0])
    assert a.boxes.dtype == np.float32 and a.labels.dtype == np.int64
    assert b.num_boxes == 1  # the crowd region is left out
    assert ds.name == "ann" and ds.skipped == ()


def test_read_coco_classes_filter_and_order(coco_dir: Path) -> None:
    ds = read_coco(write_json(coco_dir / "ann.json", coco_dict()), classes=["dog"])
    assert ds.classes == ("dog",)
    assert [r.num_boxes for r in ds.images] == [1, 1]
    assert all((r.labels == 0).all() for r in ds.images)


def test_read_coco_missing_class_is_an_error(coco_dir: Path) -> None:
    with pytest.raises(DatasetError, match=r"ann\.json.*horse"):
        read_coco(write_json(coco_dir / "ann.json", coco_dict()), classes=["dog", "horse"])


def test_read_coco_reads_size_from_image_when_absent(tmp_path: Path) -> None:
    make_image(tmp_path / "img" / "a.png", (64, 48))
    data = coco_dict(
        images=[{"id": 1, "file_name": "a.png"}],
        annotations=[{"id": 1, "image_id": 1, "category_id": 7, "bbox": [60, 40, 4.5, 8.5]}],
    )
    ds = read_coco(write_json(tmp_path / "ann.json", data), image_dir=tmp_path / "img")
    rec = ds.images[0]
    assert (rec.width, rec.height) == (64, 48)
    np.testing.assert_allclose(rec.boxes, [[60, 40, 64, 48]])  # within 1 px: clipped


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (
            {"annotations": [{"id": 9, "image_id": 5, "category_id": 7, "bbox": [0, 0, 1, 1]}]},
            "unknown image id 5",
        ),
        (
            {"annotations": [{"id": 9, "image_id": 1, "category_id": 4, "bbox": [0, 0, 1, 1]}]},
            "unknown category id 4",
        ),
        (
            {"annotations": [{"id": 9, "image_id": 1, "category_id": 7, "bbox": [3, 3, 0, 4]}]},
            "x2<=x1",
        ),
        (
            {"annotations": [{"id": 9, "image_id": 1, "category_id": 7, "bbox": [30, 3, 15, 4]}]},
            "outside the 40x30 image",
        ),
        (
            {"images": [{"id": 1, "file_name": "a.png"}, {"id": 1, "file_name": "b.png"}]},
            "duplicate image id",
        ),
        (
            {"images": [{"id": 1, "file_name": "missing.png", "width": 4, "height": 4}]},
            "missing.png does not exist",
        ),
    ],
)
def test_read_coco_malformed(coco_dir: Path, change: dict, needle: str) -> None:
    file = write_json(coco_dir / "bad_ann.json", coco_dict(**change))
    with pytest.raises(DatasetError, match=r"bad_ann\.json") as err:
        read_coco(file)
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_read_coco_skip_invalid_records_and_drops(coco_dir: Path) -> None:
    data = coco_dict(
        images=[
            {"id": 1, "file_name": "a.png", "width": 40, "height": 30},
            {"id": 2, "file_name": "missing.png", "width": 40, "height": 30},
        ],
        annotations=[
            {"id": 1, "image_id": 1, "category_id": 7, "bbox": [1, 1, 5, 5]},
            {"id": 2, "image_id": 1, "category_id": 7, "bbox": [1, 1, 0, 5]},
            {"id": 3, "image_id": 2, "category_id": 7, "bbox": [1, 1, 5, 5]},
        ],
    )
    ds = read_coco(write_json(coco_dir / "ann.json", data), skip_invalid=True)
    assert ds.ids == ["1"] and ds.images[0].num_boxes == 1
    assert len(ds.skipped) == 2
    assert all("ann.json" in s for s in ds.skipped)


@pytest.mark.parametrize("text", ["", "{not json", "[1, 2]"])
def test_read_coco_unparseable_file(tmp_path: Path, text: str) -> None:
    file = tmp_path / "broken.json"
    file.write_text(text)
    with pytest.raises(DatasetError, match=r"broken\.json"):
        read_coco(file, skip_invalid=True)  # a whole unusable file is never skipped


def test_read_coco_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        read_coco(tmp_path / "nope.json")


def sample_dataset(tmp_path: Path) -> DetectionDataset:
    recs = []
    for i, (w, h) in enumerate([(40, 30), (20, 50), (33, 33)]):
        file = make_image(tmp_path / "imgs" / f"im{i}.png", (w, h))
        n = 0 if i == 2 else 2  # the last image has no objects
        boxes = np.array([[1.5, 2.25, 10.0, 12.0], [0, 0, w, h]], dtype=np.float32)[:n]
        labels = np.array([0, 1], dtype=np.int64)[:n]
        recs.append(ImageRecord(f"x{i}", file, w, h, boxes, labels, "dom" if i else ""))
    return DetectionDataset("sample", ("cat", "dog"), tuple(recs))


def test_write_read_round_trip(tmp_path: Path) -> None:
    ds = sample_dataset(tmp_path)
    out = write_coco(ds, tmp_path / "out" / "labelled.json", {"x1": {"round": 3}})
    assert out.is_file()
    assert sorted(p.name for p in out.parent.iterdir()) == ["labelled.json"]  # no temp left
    data = json.loads(out.read_text())
    assert [im["id"] for im in data["images"]] == [1, 2, 3]
    assert data["images"][1]["round"] == 3 and data["images"][1]["alrun_id"] == "x1"
    assert [c["id"] for c in data["categories"]] == [1, 2]

    back = read_coco(out)
    assert back.classes == ds.classes and back.ids == ds.ids
    for a, b in zip(ds.images, back.images, strict=True):
        assert (a.file, a.width, a.height, a.domain) == (b.file, b.width, b.height, b.domain)
        np.testing.assert_allclose(a.boxes, b.boxes, atol=1e-4)
        np.testing.assert_array_equal(a.labels, b.labels)
        assert b.boxes.shape == (a.num_boxes, 4)


def test_write_coco_loads_in_pycocotools(tmp_path: Path) -> None:
    from pycocotools.coco import COCO

    out = write_coco(sample_dataset(tmp_path), tmp_path / "gt.json")
    gt = COCO(str(out))
    assert len(gt.getImgIds()) == 3 and len(gt.getAnnIds()) == 4


def test_write_coco_overwrites_atomically(tmp_path: Path) -> None:
    ds = sample_dataset(tmp_path)
    target = tmp_path / "gt.json"
    target.write_text("old")
    write_coco(ds, target)
    assert json.loads(target.read_text())["images"]
    assert [p for p in os.listdir(tmp_path) if p.endswith(".tmp")] == []


def test_write_coco_rejects_reserved_extra_fields(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="may not set"):
        write_coco(sample_dataset(tmp_path), tmp_path / "gt.json", {"x0": {"id": 5}})


def test_coco_splits_seeded_and_with_test_file(tmp_path: Path) -> None:
    ds = sample_dataset(tmp_path)
    pool_file = write_coco(ds, tmp_path / "pool.json")
    s1 = coco_splits(pool_file, test_fraction=0.34, split_seed=3)
    s2 = coco_splits(pool_file, test_fraction=0.34, split_seed=3)
    assert s1.test.ids == s2.test.ids and len(s1.test) == 1 and len(s1.pool) == 2

    test_ds = DetectionDataset("t", ds.classes, (ds.images[0],))
    rest = DetectionDataset("p", ds.classes, ds.images[1:])
    split = coco_splits(
        write_coco(rest, tmp_path / "p.json"),
        test_annotation_file=write_coco(test_ds, tmp_path / "t.json"),
    )
    assert split.pool.ids == ["x1", "x2"] and split.test.ids == ["x0"]
    assert split.classes == ("cat", "dog")


# --- ignore regions, areas, declared sizes (issue 6 item 6, issue 7) ------------------------


def test_crowd_annotations_become_ignore_regions_and_area_is_kept(coco_dir: Path) -> None:
    data = coco_dict()
    data["annotations"][2]["area"] = 17.5  # image 2's instance: its segmentation area
    ds = read_coco(write_json(coco_dir / "ann.json", data))
    a, b = ds.images
    assert a.ignore_boxes is None and b.num_boxes == 1
    np.testing.assert_array_equal(b.boxes, [[5, 5, 10, 10]])
    np.testing.assert_array_equal(b.ignore_boxes, [[0, 0, 9, 9]])  # the iscrowd=1 annotation
    np.testing.assert_array_equal(b.ignore_labels, [1])
    np.testing.assert_allclose(b.areas, [17.5])
    np.testing.assert_allclose(a.areas, [50.0, 1200.0])  # no area field: the box area
    # a round trip through write_coco keeps both
    back = read_coco(write_coco(ds, coco_dir / "out" / "again.json"))
    np.testing.assert_array_equal(back.images[1].ignore_boxes, b.ignore_boxes)
    np.testing.assert_allclose(back.images[1].areas, [17.5])


def test_no_area_field_anywhere_leaves_areas_unset(coco_dir: Path) -> None:
    ds = read_coco(write_json(coco_dir / "ann.json", coco_dict()))
    assert all(rec.areas is None for rec in ds.images)


def test_declared_size_differing_from_the_file_is_an_error(coco_dir: Path) -> None:
    data = coco_dict()
    data["images"][0]["width"] = 64  # b.png is 40x30 on disk
    file = write_json(coco_dir / "ann.json", data)
    with pytest.raises(DatasetError) as err:
        read_coco(file)
    assert str(err.value).startswith(f"{file}: image {coco_dir / 'b.png'} is 40x30")
    assert "declares 64x30" in str(err.value)
    ds = read_coco(file, skip_invalid=True)
    assert ds.ids == ["1"] and len(ds.skipped) == 1 and "b.png is 40x30" in ds.skipped[0]
