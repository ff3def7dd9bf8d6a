"""oracle=human end to end: the test plays the annotator between runs of the same command."""

from __future__ import annotations

import json

import pytest
from hydra.utils import instantiate

from alrun.annotation.oracle import AwaitingLabels
from alrun.loop import run_experiment
from tests.annotation.annotator import cvat_coco, labelstudio_export
from tests.helpers import compose_config

SMOKE = [
    "experiment=smoke",
    "quiet=true",
    "budget.rounds=1",
    "oracle=human",
    "oracle.prelabel_score=0.0",
]


@pytest.mark.integration  # ~30 s: three runs of the smoke loop
def test_two_rounds_with_a_person_labelling_each_batch(tmp_path):
    run = tmp_path / "run"
    splits = instantiate(compose_config(SMOKE).dataset)
    records, classes = splits.pool.by_id(), splits.classes
    exports = []
    for _ in range(5):
        labels = exports[-1] if exports else None
        overrides = [*SMOKE, *([f"oracle.labels={labels}"] if labels else [])]
        try:
            rows = run_experiment(compose_config(overrides), run)
            break
        except AwaitingLabels as waiting:
            state = json.loads((run / "awaiting_labels.json").read_text())
            assert state["state"] == "awaiting_labels" and state["batch"] == waiting.batch
            folder = waiting.folder
            assert sorted(p.name for p in folder.iterdir()) == [
                "coco_prelabels.json",
                "export",
                "images.txt",
                "labelstudio_config.xml",
                "labelstudio_tasks.json",
                "manifest.json",
                "prelabels.json",
            ]
            path = tmp_path / f"export_{waiting.batch}.json"
            if waiting.batch == 0:  # CVAT's COCO for the initial set, Label Studio after
                path.write_text(json.dumps(cvat_coco(folder, records, classes)))
            else:
                tasks = json.loads((folder / "labelstudio_tasks.json").read_text())
                assert all(t["predictions"][0]["result"] for t in tasks)  # the model's pre-labels
                export = labelstudio_export(
                    folder, records, classes, seconds=lambda r: 3.0 + 10 * r.num_boxes
                )
                path.write_text(json.dumps(export))
            exports.append(path)
    else:
        pytest.fail("the loop never finished")
    assert [r["round"] for r in rows] == [0, 1]
    assert len(exports) == 2  # batch 0 (initial set), batch 1 (round 0's selection)
    assert not (run / "awaiting_labels.json").exists()
    answers = json.loads((run / "annotation/batch_01_part0/answers.json").read_text())
    for image_id, answer in answers.items():
        record = records[image_id]
        assert answer["real_s"] == pytest.approx(3.0 + 10 * record.num_boxes)
        assert answer["model_s"] == pytest.approx(max(record.num_boxes * 25.5, 0) or 1.0)
        assert answer["objects"] == record.num_boxes
    state = json.loads((run / "state.json").read_text())
    bought = {x["image_id"]: x for x in state["labels"]}
    assert set(answers) <= set(bought)
    # the labels that trained the model are the annotator's boxes
    for image_id in answers:
        assert len(bought[image_id]["boxes"]) == records[image_id].num_boxes
