"""Reading Label Studio and CVAT exports back, and every way an export is refused (issue 23)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from alrun.annotation.batch import Batch, BatchImage, Prelabels
from alrun.annotation.coco_export import coco_file
from alrun.annotation.import_ import check_export, read_labels_file
from alrun.annotation.labelstudio import label_config, tasks
from alrun.data.dataset import ImageRecord
from alrun.errors import AlrunError
from alrun.oracle import CostModel
from tests.annotation.annotator import cvat_coco, labelstudio_export

CLASSES = ("RBC", "WBC", "Platelets")


def rec(image_id, boxes, labels, width=64, height=48) -> ImageRecord:
    return ImageRecord(
        image_id,
        Path(f"/data/img/{image_id}.jpg"),
        width,
        height,
        np.asarray(boxes, np.float32).reshape(-1, 4),
        np.asarray(labels, np.int64),
    )


TRUTH = {
    "a": rec("a", ((4, 4, 20, 20), (30, 10, 50, 40)), (0, 1)),
    "b": rec("b", (), ()),
    "c": rec("c", ((5, 5, 15, 15),), (2,)),
}
PRE = {"a": Prelabels(((4.0, 5.0, 21.0, 20.0), (0.0, 0.0, 9.0, 9.0)), (0, 2), (0.9, 0.4))}


def export_batch(tmp_path: Path, kind: str = "box", batch: int = 1, run: str = "run1") -> Path:
    """What HumanOracle writes for a batch of a, b, c (manifest + tool files)."""
    folder = tmp_path / f"batch_{batch:02d}_part0"
    folder.mkdir()
    spec = Batch(
        run,
        batch,
        0,
        kind,
        CLASSES,
        tuple(BatchImage(r.image_id, str(r.file), r.width, r.height) for r in TRUTH.values()),
    )
    (folder / "manifest.json").write_text(json.dumps(spec.to_json()))
    (folder / "labelstudio_tasks.json").write_text(json.dumps(tasks(spec, PRE, "/x?d={file}", "m")))
    (folder / "coco_prelabels.json").write_text(json.dumps(coco_file(spec, PRE)))
    return folder


def spec_of(folder: Path) -> Batch:
    return Batch.from_json(json.loads((folder / "manifest.json").read_text()))


def load(tmp_path, folder, export, wanted=("a", "b", "c"), proposals=PRE):
    path = tmp_path / "export.json"
    path.write_text(json.dumps(export))
    spec = spec_of(folder)
    return check_export(
        path, read_labels_file(path, spec), spec, list(wanted), CostModel(), proposals
    )


def test_label_configs_are_the_tools_xml():
    import xml.etree.ElementTree as ET

    for kind, tag in (
        ("box", "RectangleLabels"),
        ("click", "KeyPointLabels"),
        ("image_label", "Choices"),
    ):
        root = ET.fromstring(label_config(kind, CLASSES))
        control = root.find(tag)
        assert root.find("Image").get("value") == "$image" and control.get("toName") == "image"
        values = [c.get("value") for c in control]
        assert values == list(CLASSES)
    assert (
        ET.fromstring(label_config("image_label", CLASSES)).find("Choices").get("choice")
        == "multiple"
    )


def test_tasks_carry_predictions_in_percent_and_the_ids(tmp_path):
    folder = export_batch(tmp_path)
    task = json.loads((folder / "labelstudio_tasks.json").read_text())[0]
    assert task["data"] == {
        "image": "/x?d=/data/img/a.jpg",
        "image_id": "a",
        "alrun_run": "run1",
        "alrun_batch": 1,
        "alrun_part": 0,
    }
    region = task["predictions"][0]["result"][0]
    assert region["type"] == "rectanglelabels" and region["value"]["rectanglelabels"] == ["RBC"]
    assert region["value"]["x"] == pytest.approx(100 * 4 / 64)
    assert region["value"]["height"] == pytest.approx(100 * 15 / 48)
    coco = json.loads((folder / "coco_prelabels.json").read_text())
    assert coco["annotations"][0]["bbox"] == [4.0, 5.0, 17.0, 15.0]
    assert coco["annotations"][1]["category_id"] == 3


@pytest.mark.parametrize("kind", ["box", "click", "center_click", "image_label"])
def test_a_labelstudio_export_comes_back_as_the_truth_with_its_lead_time(tmp_path, kind):
    folder = export_batch(tmp_path, kind)
    found = load(
        tmp_path,
        folder,
        labelstudio_export(folder, TRUTH, CLASSES, seconds=lambda r: 2.0 + r.num_boxes),
    )
    a = found["a"].labels
    assert found["a"].real_s == 4.0 and a.cost_s == 4.0
    if kind == "box":
        np.testing.assert_allclose(a.boxes, TRUTH["a"].boxes, atol=1e-4)
        assert found["a"].model_s == 2 * 25.5 and found["b"].model_s == 1.0  # empty image
    elif kind == "image_label":
        assert a.image_classes.tolist() == [0, 1] and found["b"].labels.image_classes.tolist() == []
    else:
        np.testing.assert_allclose(a.points, [[12, 12], [40, 25]], atol=1e-4)
    if kind != "image_label":
        assert a.labels.tolist() == [0, 1]


def test_a_cvat_coco_export_comes_back_as_the_truth_matched_by_file_name(tmp_path):
    folder = export_batch(tmp_path)
    found = load(tmp_path, folder, cvat_coco(folder, TRUTH, CLASSES))
    np.testing.assert_allclose(found["c"].labels.boxes, [[5, 5, 15, 15]])
    assert found["c"].labels.labels.tolist() == [2]
    assert found["b"].labels.boxes.shape == (0, 4)  # listed without annotations: nothing there
    assert found["a"].real_s is None and found["a"].labels.cost_s == 2 * 25.5


def test_verification_keeps_the_proposals_left_in_place(tmp_path):
    folder = export_batch(tmp_path, "verify")
    export = labelstudio_export(folder, TRUTH, CLASSES)
    kept = dict(export[0]["predictions"][0]["result"][0])  # the annotator kept proposal p0 only
    export[0]["annotations"][0]["result"] = [kept]
    for task in export[1:]:
        task["annotations"][0]["result"] = []
    found = load(tmp_path, folder, export)
    assert found["a"].labels.verified.tolist() == [True, False]
    assert found["a"].model_s == 2 * 1.6
    # a COCO file (no region ids): the kept box is matched by overlap
    coco = json.loads((folder / "coco_prelabels.json").read_text())
    coco["annotations"] = coco["annotations"][1:]
    assert load(tmp_path, folder, coco)["a"].labels.verified.tolist() == [False, True]


def test_partial_exports_import_what_they_hold(tmp_path):
    folder = export_batch(tmp_path)
    found = load(tmp_path, folder, labelstudio_export(folder, TRUTH, CLASSES, skip={"b"}))
    assert sorted(found) == ["a", "c"]
    # what an earlier import took is not taken again
    assert sorted(
        load(tmp_path, folder, labelstudio_export(folder, TRUTH, CLASSES), wanted=["b"])
    ) == ["b"]


def _ls(folder):
    return labelstudio_export(folder, TRUTH, CLASSES)


def _region(export, n=0):
    return export[0]["annotations"][0]["result"][n]


def _not_selected(folder):
    export = _ls(folder)
    export[0]["data"]["image_id"] = "zzz"
    return export


def _unknown_class(folder):
    export = _ls(folder)
    _region(export)["value"]["rectanglelabels"] = ["Neutrophil"]
    return export


def _outside(folder):
    export = _ls(folder)
    _region(export)["value"]["x"] = 95.0
    return export


def _twice(folder):
    export = _ls(folder)
    export[0]["annotations"][0]["result"].append(dict(_region(export), id="dup"))
    return export


def _image_twice(folder):
    export = _ls(folder)
    return [*export, dict(export[0], id=99)]


def _point_for_box(folder):
    export = _ls(folder)
    region = _region(export)
    region.update(
        type="keypointlabels", value={"x": 10.0, "y": 10.0, "width": 0.5, "keypointlabels": ["RBC"]}
    )
    return export


def _two_annotations(folder):
    export = _ls(folder)
    export[0]["annotations"].append(dict(export[0]["annotations"][0], id=7))
    return export


def _other_run(folder):
    export = _ls(folder)
    export[1]["data"]["alrun_run"] = "someone-else"
    return export


def _other_round(folder):
    export = _ls(folder)
    for task in export:
        task["data"]["alrun_batch"] = 2
    return export


def _coco_other_round(folder):
    coco = json.loads((folder / "coco_prelabels.json").read_text())
    coco["info"]["alrun_batch"] = 0
    return coco


def _coco_outside(folder):
    coco = cvat_coco(folder, TRUTH, CLASSES)
    coco["annotations"][0]["bbox"] = [60, 4, 10, 10]
    return coco


def _coco_unknown_file(folder):
    coco = cvat_coco(folder, TRUTH, CLASSES)
    coco["images"][0]["file_name"] = "elsewhere.jpg"
    return coco


def _coco_keypoints(folder):
    coco = cvat_coco(folder, TRUTH, CLASSES)
    coco["annotations"][0]["keypoints"] = [10, 10, 2]
    return coco


CASES = {
    "not selected": (
        _not_selected,
        "task 1: image 'zzz' was not selected in batch_01_part0; expected one of its 3 images",
    ),
    "unknown class": (
        _unknown_class,
        "task 1 (image 'a', 64x48): unknown class 'Neutrophil'; "
        "expected one of RBC, WBC, Platelets",
    ),
    "outside": (
        _outside,
        "task 1 (image 'a', 64x48): box (60.8, 4, 76.8, 20) is outside the image; "
        "expected 0 <= x <= 64 and 0 <= y <= 48",
    ),
    "duplicate box": (
        _twice,
        "task 1 (image 'a', 64x48): box (4, 4, 20, 20) of class 0 twice; expected each object once",
    ),
    "duplicate image": (
        _image_twice,
        "task 99: image 'a' again (first in task 1); expected each image once",
    ),
    "point for box": (
        _point_for_box,
        "task 1 (image 'a', 64x48): a point where a box was asked; expected box labels",
    ),
    "two annotations": (_two_annotations, "task 1: 2 annotations of image 'a'; expected one"),
    "other run": (_other_run, "task 2: exported for run someone-else, not this run (run1)"),
    "other round": (
        _other_round,
        "task 1: exported for batch 2 part 0, expected batch 1 part 0 (batch_01_part0)",
    ),
    "coco other round": (_coco_other_round, "exported for batch 0 part 0, expected batch 1 part 0"),
    "coco outside": (
        _coco_outside,
        "image 'a.jpg' (image 'a', 64x48): box (60, 4, 70, 14) is outside the image",
    ),
    "coco unknown file": (
        _coco_unknown_file,
        "image 'elsewhere.jpg': image 'elsewhere.jpg' was not selected",
    ),
    "coco keypoints": (
        _coco_keypoints,
        "image 'a.jpg' (image 'a', 64x48): a point where a box was asked",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_bad_export_is_one_line_naming_file_item_and_expectation(tmp_path, case):
    make, expected = CASES[case]
    folder = export_batch(tmp_path)
    with pytest.raises(AlrunError) as err:
        load(tmp_path, folder, make(folder))
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"oracle.labels: {tmp_path / 'export.json'}")
    assert expected in message


def test_a_box_where_a_click_was_asked(tmp_path):
    folder = export_batch(tmp_path, "click")
    export = _ls(folder)
    region = _region(export)
    region.update(
        type="rectanglelabels",
        value={
            "x": 1.0,
            "y": 1.0,
            "width": 5.0,
            "height": 5.0,
            "rotation": 0,
            "rectanglelabels": ["RBC"],
        },
    )
    with pytest.raises(AlrunError, match="a box where a click was asked; expected click labels"):
        load(tmp_path, folder, export)


def test_not_json_and_not_an_export(tmp_path):
    folder = export_batch(tmp_path)
    spec = spec_of(folder)
    path = tmp_path / "x.json"
    path.write_text("{oops")
    with pytest.raises(
        AlrunError, match=r"x.json: not JSON .*expected Label Studio's JSON export or a COCO file"
    ):
        read_labels_file(path, spec)
    path.write_text(json.dumps({"images": []}))
    with pytest.raises(
        AlrunError, match="expected COCO with 'images', 'annotations' and 'categories'"
    ):
        read_labels_file(path, spec)
    path.write_text(json.dumps([{"data": {"image": "x"}}]))
    with pytest.raises(AlrunError, match="task 1: no alrun ids in the task data"):
        read_labels_file(path, spec)


def test_an_export_written_by_label_studio_itself(tmp_path):
    """data/labelstudio_1.23.2_export.json: GET /api/projects/<id>/export?exportType=JSON of a
    real Label Studio 1.23.2 after test_labelstudio_server's round trip (run 56be9610b544)."""
    real = json.loads((Path(__file__).parent / "data/labelstudio_1.23.2_export.json").read_text())
    folder = export_batch(tmp_path, run="56be9610b544")
    found = load(tmp_path, folder, real)
    assert [found[i].real_s for i in "abc"] == [4.5, 2.5, 3.5]
    for image_id in "abc":
        np.testing.assert_allclose(found[image_id].labels.boxes, TRUTH[image_id].boxes, atol=1e-3)
    with pytest.raises(AlrunError, match="exported for run 56be9610b544, not this run"):
        (tmp_path / "other").mkdir()
        load(tmp_path, export_batch(tmp_path / "other", run="another"), real)
