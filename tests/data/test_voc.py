import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from alrun.data.voc import read_voc, voc_splits
from alrun.errors import DatasetError

SHARED = (
    Path(os.environ.get("ALRUN_SHARED", Path(__file__).resolve().parents[3] / "shared"))
    / "datasets"
)


def shared_dataset(name: str) -> Path:
    path = SHARED / name
    if not path.is_dir():
        pytest.skip(f"shared dataset {path} not found (set ALRUN_SHARED to the shared/ folder)")
    return path


@pytest.fixture
def bccd() -> Path:
    return shared_dataset("bccd")


@pytest.fixture
def cards() -> Path:
    return shared_dataset("cards")


def test_bccd_full_set_fails_on_zero_area_box(bccd: Path) -> None:
    with pytest.raises(DatasetError) as err:
        read_voc(bccd)
    message = str(err.value)
    assert "BloodImage_00338.xml" in message and "object 12 (RBC)" in message
    assert "x2<=x1" in message and "\n" not in message


def test_bccd_full_set_skip_invalid_records_two_boxes(bccd: Path) -> None:
    ds = read_voc(bccd, skip_invalid=True)
    assert len(ds) == 364 and ds.num_boxes == 4888 - 2
    assert len(ds.skipped) == 2
    assert "BloodImage_00338.xml" in ds.skipped[0] and "BloodImage_00343.xml" in ds.skipped[1]
    assert ds.classes == ("Platelets", "RBC", "WBC")
    assert ds.ids == sorted(ds.ids)
    rec = ds.by_id()["BloodImage_00338"]
    assert (rec.width, rec.height) == (640, 480) and rec.num_boxes == 13
    assert rec.boxes.dtype == np.float32 and rec.labels.dtype == np.int64


def test_bccd_splits(bccd: Path) -> None:
    splits = voc_splits(bccd, skip_invalid=True)
    assert (len(splits.pool), len(splits.test)) == (292, 72)
    assert (splits.pool.num_boxes, splits.test.num_boxes) == (3941, 945)
    assert len(splits.pool.skipped) == 2 and splits.test.skipped == ()
    with pytest.raises(DatasetError, match=r"BloodImage_00338\.xml"):
        voc_splits(bccd)


def test_bccd_test_split_is_clean(bccd: Path) -> None:
    ds = read_voc(bccd, split="test", classes=["RBC", "WBC", "Platelets"])
    assert len(ds) == 72 and ds.classes == ("RBC", "WBC", "Platelets")
    assert ds.name == "bccd:test"


def test_cards_directory_layout_and_upper_case_extensions(cards: Path) -> None:
    splits = voc_splits(
        cards,
        pool_split=None,
        annotations_dir="train",
        images_dir="train",
        test_annotations_dir="test",
        test_images_dir="test",
    )
    assert (len(splits.pool), len(splits.test)) == (296, 67)
    assert splits.pool.num_boxes + splits.test.num_boxes == 670
    assert splits.classes == ("ace", "jack", "king", "nine", "queen", "ten")
    suffixes = {rec.file.suffix for rec in (*splits.pool.images, *splits.test.images)}
    assert suffixes == {".jpg", ".JPG"}
    assert all(rec.file.is_file() for rec in splits.pool.images)


# --- malformed inputs built under tmp_path ---------------------------------------------------


def voc_xml(filename: str, objects: list[tuple], size: tuple[int, int] | None = (40, 30)):
    """An annotation; an object is ``(name, box)`` or ``(name, box, difficult)``."""
    size_xml = f"<size><width>{size[0]}</width><height>{size[1]}</height></size>" if size else ""
    objs = "".join(
        f"<object><name>{o[0]}</name><difficult>{int(o[2]) if len(o) > 2 else 0}</difficult>"
        f"<bndbox><xmin>{o[1][0]}</xmin><ymin>{o[1][1]}</ymin><xmax>{o[1][2]}</xmax>"
        f"<ymax>{o[1][3]}</ymax></bndbox></object>"
        for o in objects
    )
    return f"<annotation><filename>{filename}</filename>{size_xml}{objs}</annotation>"


def make_voc(
    root: Path, items: dict[str, list[tuple[str, tuple]]], split: str | None = "all"
) -> Path:
    (root / "Annotations").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    for stem, objects in items.items():
        Image.new("RGB", (40, 30)).save(root / "JPEGImages" / f"{stem}.jpg")
        (root / "Annotations" / f"{stem}.xml").write_text(voc_xml(f"{stem}.jpg", objects))
    if split:
        (root / "ImageSets" / "Main").mkdir(parents=True)
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(items) + "\n")
    return root


def test_tmp_voc_reads(tmp_path: Path) -> None:
    root = make_voc(
        tmp_path / "voc",
        {
            "b": [("cat", (1, 2, 10, 12))],
            "a": [],
            "c": [("dog", (0, 0, 40.5, 30)), ("cat", (5, 5, 6, 6))],
        },
    )
    ds = read_voc(root, split="all")
    assert ds.ids == ["a", "b", "c"] and ds.classes == ("cat", "dog")
    assert ds.images[0].boxes.shape == (0, 4) and ds.images[0].labels.shape == (0,)
    np.testing.assert_array_equal(ds.images[2].boxes, [[0, 0, 40, 30], [5, 5, 6, 6]])  # clipped
    np.testing.assert_array_equal(ds.images[2].labels, [1, 0])
    assert ds.images[2].ignore_boxes is None


def test_difficult_objects_are_ignore_regions_unless_use_difficult(tmp_path: Path) -> None:
    items = {"a": [("dog", (0, 0, 20, 30)), ("cat", (5, 5, 9, 9), True), ("cat", (1, 1, 3, 3))]}
    root = make_voc(tmp_path / "voc", items)
    rec = read_voc(root, split="all").images[0]
    np.testing.assert_array_equal(rec.boxes, [[0, 0, 20, 30], [1, 1, 3, 3]])
    np.testing.assert_array_equal(rec.labels, [1, 0])
    np.testing.assert_array_equal(rec.ignore_boxes, [[5, 5, 9, 9]])
    np.testing.assert_array_equal(rec.ignore_labels, [0])
    kept = read_voc(root, split="all", use_difficult=True).images[0]
    assert kept.num_boxes == 3 and kept.ignore_boxes is None
    (root / "Pool").mkdir()
    (root / "Pool" / "p.xml").write_text(voc_xml("a.jpg", []))
    for use_difficult, boxes in ((False, 2), (True, 3)):
        splits = voc_splits(
            root,
            pool_split=None,
            annotations_dir="Pool",
            test_annotations_dir="Annotations",
            use_difficult=use_difficult,
        )
        assert splits.test.images[0].num_boxes == boxes


def test_missing_root_and_split(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"dataset\.root: .*nowhere does not exist"):
        read_voc(tmp_path / "nowhere")
    root = make_voc(tmp_path / "voc", {"a": []})
    with pytest.raises(DatasetError, match=r"val\.txt.*available splits: \['all'\]"):
        read_voc(root, split="val")


def test_image_found_by_stem_when_filename_is_wrong(tmp_path: Path) -> None:
    root = make_voc(tmp_path / "voc", {"a": [("cat", (1, 1, 5, 5))]})
    (root / "JPEGImages" / "a.jpg").rename(root / "JPEGImages" / "a.JPG")
    ds = read_voc(root)
    assert ds.images[0].file.name == "a.JPG"


def test_size_read_from_image_when_absent(tmp_path: Path) -> None:
    root = make_voc(tmp_path / "voc", {"a": []})
    Image.new("RGB", (64, 48)).save(root / "JPEGImages" / "a.jpg")
    (root / "Annotations" / "a.xml").write_text(voc_xml("a.jpg", [("cat", (1, 1, 64, 48))], None))
    rec = read_voc(root).images[0]
    assert (rec.width, rec.height) == (64, 48)


@pytest.mark.parametrize(
    ("objects", "needle"),
    [
        ([("cat", (5, 1, 5, 9))], "object 0 (cat) has x2<=x1 (5.0 <= 5.0)"),
        ([("cat", (1, 1, 5, 5)), ("cat", (5, 9, 8, 3))], "object 1 (cat) has y2<=y1"),
        ([("cat", (10, 10, 50, 20))], "outside the 40x30 image"),
        ([("cat", (1, "x", 5, 5))], "non-numeric"),
    ],
)
def test_bad_boxes(tmp_path: Path, objects: list, needle: str) -> None:
    root = make_voc(tmp_path / "voc", {"good": [("cat", (1, 1, 5, 5))], "bad_one": objects})
    with pytest.raises(DatasetError, match=r"bad_one\.xml") as err:
        read_voc(root)
    assert needle in str(err.value)
    ds = read_voc(root, skip_invalid=True)
    assert len(ds) == 2 and len(ds.skipped) == 1 and "bad_one.xml" in ds.skipped[0]


def test_unknown_class_name(tmp_path: Path) -> None:
    root = make_voc(tmp_path / "voc", {"a": [("cat", (1, 1, 5, 5)), ("cow", (1, 1, 5, 5))]})
    with pytest.raises(
        DatasetError, match=r"a\.xml: object 1 \(cow\) has unknown class 'cow'"
    ) as e:
        read_voc(root, classes=["cat", "dog"])
    assert "'cat', 'dog'" in str(e.value)
    ds = read_voc(root, classes=["cat", "dog"], skip_invalid=True, use_difficult=True)
    assert ds.images[0].num_boxes == 1 and len(ds.skipped) == 1


def test_missing_image_file(tmp_path: Path) -> None:
    root = make_voc(tmp_path / "voc", {"a": [], "lost": []})
    (root / "JPEGImages" / "lost.jpg").unlink()
    with pytest.raises(DatasetError, match=r"lost\.xml: image file not found.*lost\.jpg"):
        read_voc(root)
    ds = read_voc(root, skip_invalid=True)
    assert ds.ids == ["a"] and len(ds.skipped) == 1


@pytest.mark.parametrize(
    ("text", "needle"), [("", "empty annotation file"), ("<annotation>", "invalid XML")]
)
def test_unparseable_xml(tmp_path: Path, text: str, needle: str) -> None:
    root = make_voc(tmp_path / "voc", {"a": [], "broken": []})
    (root / "Annotations" / "broken.xml").write_text(text)
    with pytest.raises(DatasetError, match=rf"broken\.xml: {needle}"):
        read_voc(root)
    ds = read_voc(root, skip_invalid=True)
    assert ds.ids == ["a"] and "broken.xml" in ds.skipped[0]


def test_duplicate_ids_in_split_file(tmp_path: Path) -> None:
    root = make_voc(tmp_path / "voc", {"a": [], "b": []})
    (root / "ImageSets" / "Main" / "all.txt").write_text("a\nb\na\n")
    with pytest.raises(DatasetError, match=r"all\.txt: duplicate image id 'a'"):
        read_voc(root, split="all")


def test_splits_share_union_of_classes(tmp_path: Path) -> None:
    root = make_voc(tmp_path / "voc", {"a": [("cat", (1, 1, 5, 5))], "b": [("dog", (1, 1, 5, 5))]})
    main = root / "ImageSets" / "Main"
    (main / "trainval.txt").write_text("a\n")
    (main / "test.txt").write_text("b\n")
    splits = voc_splits(root)
    assert splits.pool.classes == splits.test.classes == ("cat", "dog")
    seeded = voc_splits(root, pool_split="all", test_fraction=0.5, split_seed=1)
    assert len(seeded.pool) == len(seeded.test) == 1


def test_declared_size_must_match_the_image(tmp_path: Path) -> None:
    root = make_voc(tmp_path / "voc", {"a": [("cat", (1, 1, 5, 5))], "b": []})
    Image.new("RGB", (30, 40)).save(root / "JPEGImages" / "b.jpg")  # the XML says 40x30
    with pytest.raises(DatasetError, match=r"b\.xml: image .*b\.jpg is 30x40 .* declares 40x30"):
        read_voc(root)
    ds = read_voc(root, skip_invalid=True)
    assert ds.ids == ["a"] and "b.xml" in ds.skipped[0]
