import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from alrun.data.yolo import read_yolo, yolo_splits
from alrun.errors import DatasetError

SHARED = (
    Path(os.environ.get("ALRUN_SHARED", Path(__file__).resolve().parents[3] / "shared"))
    / "datasets"
)


@pytest.fixture
def txl_pbc() -> Path:
    path = SHARED / "txl_pbc"
    if not path.is_dir():
        pytest.skip(f"shared dataset {path} not found (set ALRUN_SHARED to the shared/ folder)")
    return path


def test_txl_pbc_train(txl_pbc: Path) -> None:
    ds = read_yolo(txl_pbc, "train")
    assert len(ds) == 1008 and ds.classes == ("WBC", "RBC", "Platelets")
    assert ds.ids == sorted(ds.ids) and ds.skipped == ()
    assert Counter(r.domain for r in ds.images) == {
        "Raabin": 350,
        "PBC": 340,
        "BCD": 158,
        "BCCD": 150,
        "other": 10,
    }
    assert all(r.num_boxes > 0 for r in ds.images)
    rec = ds.images[0]
    assert rec.boxes.dtype == np.float32 and rec.labels.dtype == np.int64
    assert (rec.boxes[:, 2] <= rec.width).all() and (rec.boxes[:, 3] <= rec.height).all()


def test_txl_pbc_domain_filter(txl_pbc: Path) -> None:
    splits = yolo_splits(txl_pbc, domains=["BCCD", "BCD"])
    assert (len(splits.pool), len(splits.test)) == (150 + 158, 27 + 17)
    assert {r.domain for r in (*splits.pool.images, *splits.test.images)} == {"BCCD", "BCD"}
    with pytest.raises(DatasetError, match=r"unknown domains \['Mars'\].*'BCCD'"):
        yolo_splits(txl_pbc, domains=["Mars"])


def test_txl_pbc_explicit_classes_too_short(txl_pbc: Path) -> None:
    with pytest.raises(DatasetError, match=r"\.txt: line \d+ has unknown class id"):
        read_yolo(txl_pbc, "test", classes=["WBC"])


# --- hand-made datasets under tmp_path -----------------------------------------------------


def make_yolo(root: Path, labels: dict[str, str | None], names="names: [cat, dog]\n") -> Path:
    for split in ("train", "test"):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
    for stem, text in labels.items():
        Image.new("RGB", (40, 20)).save(root / "images" / "train" / f"{stem}.png")
        if text is not None:
            (root / "labels" / "train" / f"{stem}.txt").write_text(text)
    Image.new("RGB", (40, 20)).save(root / "images" / "test" / "t.png")
    if names is not None:
        (root / "data.yaml").write_text(names)
    return root


def test_tmp_yolo_boxes_and_background_images(tmp_path: Path) -> None:
    root = make_yolo(
        tmp_path / "y",
        {"b": "1 0.5 0.5 0.5 0.5\n\n0 0.25 0.25 0.5 0.5\n", "a": None, "c": ""},
    )
    ds = read_yolo(root)
    assert ds.ids == ["a", "b", "c"] and ds.classes == ("cat", "dog")
    assert ds.images[0].boxes.shape == (0, 4) and ds.images[2].labels.shape == (0,)
    np.testing.assert_allclose(ds.images[1].boxes, [[10, 5, 30, 15], [0, 0, 20, 10]])
    np.testing.assert_array_equal(ds.images[1].labels, [1, 0])
    assert ds.images[1].domain == ""


def test_names_dict_form_and_domains(tmp_path: Path) -> None:
    root = make_yolo(
        tmp_path / "y", {"a": "1 0.5 0.5 0.2 0.2\n"}, names="names:\n  1: dog\n  0: cat\n"
    )
    (root / "domains.csv").write_text("file,split,width,height,domain\na.png,train,40,20,lab\n")
    ds = read_yolo(root)
    assert ds.classes == ("cat", "dog") and ds.images[0].domain == "lab"
    splits = yolo_splits(root, domains=None)
    assert splits.test.ids == ["t"]


@pytest.mark.parametrize(
    "line", ["0 0.5 0.5 0.2", "0 0.5 0.5 0.2 0.2 0.9", "cat 0.5 0.5 0.2 0.2", "0.5 0.5 0.5 0.2 0.2"]
)
def test_bad_line(tmp_path: Path, line: str) -> None:
    root = make_yolo(tmp_path / "y", {"ok": "", "bad": f"0 0.5 0.5 0.2 0.2\n{line}\n"})
    with pytest.raises(DatasetError, match=r"bad\.txt: line 2: expected 'class cx cy w h'"):
        read_yolo(root)
    ds = read_yolo(root, skip_invalid=True)
    assert ds.ids == ["ok"] and len(ds.skipped) == 1 and "bad.txt" in ds.skipped[0]


def test_unknown_class_id(tmp_path: Path) -> None:
    root = make_yolo(tmp_path / "y", {"a": "0 0.5 0.5 0.2 0.2\n2 0.5 0.5 0.2 0.2\n"})
    with pytest.raises(DatasetError, match=r"a\.txt: line 2 has unknown class id 2.*'cat', 'dog'"):
        read_yolo(root)
    ds = read_yolo(root, classes=["cat", "dog", "cow"])
    np.testing.assert_array_equal(ds.images[0].labels, [0, 2])
    skipped = read_yolo(root, skip_invalid=True)
    assert skipped.images[0].num_boxes == 1 and len(skipped.skipped) == 1


def test_box_outside_image(tmp_path: Path) -> None:
    root = make_yolo(tmp_path / "y", {"a": "0 0.9 0.5 0.4 0.2\n0 0.5 0.5 1.02 1.0\n"})
    with pytest.raises(
        DatasetError, match=r"a\.txt: line 1 \(cat\) box .* outside the 40x20 image"
    ):
        read_yolo(root)
    ds = read_yolo(root, skip_invalid=True)
    np.testing.assert_allclose(ds.images[0].boxes, [[0, 0, 40, 20]])  # 0.4 px over: clipped


def test_zero_size_box(tmp_path: Path) -> None:
    root = make_yolo(tmp_path / "y", {"a": "1 0.5 0.5 0.0 0.2\n"})
    with pytest.raises(DatasetError, match=r"a\.txt: line 1 \(dog\) has x2<=x1") as err:
        read_yolo(root)
    # the message names the switch that drops such items (a Roboflow export often has some)
    assert str(err.value).endswith(
        "; dataset.skip_invalid=true drops such items and lists them in skipped.json"
    )
    ds = read_yolo(root, skip_invalid=True)
    assert ds.images[0].num_boxes == 0 and "x2<=x1" in ds.skipped[0]  # the box is dropped


def test_duplicate_stems(tmp_path: Path) -> None:
    root = make_yolo(tmp_path / "y", {"a": ""})
    Image.new("RGB", (8, 8)).save(root / "images" / "train" / "a.jpg")
    with pytest.raises(DatasetError, match=r"a\.png: duplicate image id 'a'"):
        read_yolo(root)


def test_unreadable_image(tmp_path: Path) -> None:
    root = make_yolo(tmp_path / "y", {"a": ""})
    (root / "images" / "train" / "z.jpg").write_bytes(b"not an image")
    with pytest.raises(DatasetError, match=r"z\.jpg: cannot read image"):
        read_yolo(root)


def test_missing_root_split_and_classes(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"dataset\.root: .*nowhere does not exist"):
        read_yolo(tmp_path / "nowhere")
    root = make_yolo(tmp_path / "y", {"a": ""}, names=None)
    with pytest.raises(DatasetError, match=r"no data\.yaml"):
        read_yolo(root)
    (root / "labels" / "classes.txt").write_text("cat\ndog\n")
    assert read_yolo(root).classes == ("cat", "dog")
    with pytest.raises(
        DatasetError, match=r"val/images exists; available splits: \['test', 'train'\]"
    ):
        read_yolo(root, "val")
    with pytest.raises(DatasetError, match=r"domains\.csv does not exist"):
        yolo_splits(root, domains=["lab"])


# --- data.yaml and the layouts exporters write (issue 6 item 14) ----------------------------


def _assert_fabricated(splits) -> None:
    """The splits of tests/data/builders.make_yolo: 8 train images, 4 val, one box each."""
    from tests.data.builders import OBJECTS

    assert splits.pool.ids == list(OBJECTS)[:8] and splits.test.ids == list(OBJECTS)[8:]
    assert splits.classes == ("cat", "dog")
    rec = splits.pool.images[3]
    np.testing.assert_allclose(rec.boxes, [OBJECTS["im03"][0][1]], atol=1e-4)
    np.testing.assert_array_equal(rec.labels, [1])


@pytest.mark.parametrize("layout", ["images/split", "split/images"])
def test_data_yaml_splits_in_both_layouts(tmp_path: Path, layout: str) -> None:
    from tests.data.builders import make_yolo as build

    sub = "images/{}" if layout == "images/split" else "{}/images"
    text = (
        f"path: .\ntrain: {sub.format('train')}\nval: {sub.format('val')}\n"
        "names:\n  0: cat\n  1: dog\n"
    )
    root = build(tmp_path / "ds", layout, text)
    _assert_fabricated(yolo_splits(root, "train", "val"))
    # root may also be the yaml file itself
    _assert_fabricated(yolo_splits(root / "data.yaml", "train", "val"))


def test_split_images_layout_without_split_keys(tmp_path: Path) -> None:
    from tests.data.builders import make_yolo as build

    root = build(tmp_path / "ds", "split/images")  # data.yaml has names only
    _assert_fabricated(yolo_splits(root, "train", "val"))


def test_data_yaml_roboflow_paths_txt_lists_and_lists_of_dirs(tmp_path: Path) -> None:
    from tests.data.builders import make_yolo as build

    root = build(tmp_path / "ds", "split/images", "names: [cat, dog]\n")
    # Roboflow writes ../train/images relative to a yaml inside the dataset folder
    (root / "data.yaml").write_text("train: ../train/images\nval: [val.txt]\nnames: [cat, dog]\n")
    (root / "val.txt").write_text(
        "".join(f"./val/images/{p.name}\n" for p in sorted((root / "val" / "images").iterdir()))
    )
    _assert_fabricated(yolo_splits(root, "train", "val"))
    (root / "data.yaml").write_text("train: [train/images, val/images]\nnames: [cat, dog]\n")
    both = read_yolo(root, "train")
    assert len(both) == 12 and both.num_boxes == 12


def test_data_yaml_missing_directory_is_one_line(tmp_path: Path) -> None:
    from tests.data.builders import make_yolo as build

    root = build(
        tmp_path / "ds",
        "images/split",
        "train: images/train\nval: images/valid\nnames: [cat, dog]\n",
    )
    with pytest.raises(DatasetError) as err:
        yolo_splits(root, "train", "val")
    message = str(err.value)
    assert message == (
        f"{root / 'data.yaml'}: 'val' names {root / 'images' / 'valid'}, which does not exist"
    )
    with pytest.raises(DatasetError, match=r"no 'test' split \(it names \['train', 'val'\]\)"):
        (root / "images" / "val").rename(root / "images" / "valid")
        yolo_splits(root, "train", "test")


def test_test_split_null_is_a_seeded_split_by_split_seed(tmp_path: Path) -> None:
    from tests.data.builders import make_yolo as build

    root = build(tmp_path / "ds")
    a = yolo_splits(root, "train", None, test_fraction=0.25, split_seed=0)
    b = yolo_splits(root, "train", None, test_fraction=0.25, split_seed=0)
    c = yolo_splits(root, "train", None, test_fraction=0.25, split_seed=5)
    assert a.test.ids == b.test.ids and len(a.test) == 2 and len(a.pool) == 6
    assert a.split_seed == 0 and c.test.ids != a.test.ids


def test_every_label_file_empty_warns(tmp_path: Path, caplog) -> None:
    from tests.data.builders import make_yolo as build

    root = build(tmp_path / "ds")
    for label in (root / "labels" / "train").iterdir():
        label.write_text("")
    with caplog.at_level("WARNING", logger="alrun"):
        ds = read_yolo(root, "train")
    assert ds.num_boxes == 0
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and "every label file of its 8 images is missing or empty" in warned[0]
    assert str(root / "labels" / "train" / "im00.txt") in warned[0]
    caplog.clear()
    with caplog.at_level("WARNING", logger="alrun"):
        read_yolo(root, "val")  # labelled: no warning
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
