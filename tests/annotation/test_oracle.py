"""HumanOracle without training: export, wait, import (all or part), refuse, answer again."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from alrun.annotation.oracle import (
    AwaitingLabels,
    BatchedOracle,
    HumanOracle,
    attach_oracle,
    begin_oracle_batch,
)
from alrun.errors import AlrunError
from alrun.oracle import CostModel, SimulatedOracle
from alrun.types import Detections
from tests.annotation.annotator import labelstudio_export
from tests.annotation.test_import import CLASSES, TRUTH

RECORDS = list(TRUTH.values())


class Model:
    """Predicts one box per image (the pre-annotation the annotator sees)."""

    def predict(self, records, needs, progress=None):
        return [
            Detections(
                r.image_id,
                torch.tensor([[1.0, 2.0, 11.0, 12.0]]),
                torch.tensor([0.8]),
                torch.tensor([1]),
            )
            for r in records
        ]


def human(tmp_path, labels=None, partial="no") -> HumanOracle:
    oracle = HumanOracle(SimulatedOracle(CostModel()), labels=labels, partial=partial)
    oracle.check_data(SimpleNamespace(classes=CLASSES))
    oracle.attach(tmp_path / "run")
    oracle.begin_batch(1, Model())
    return oracle


def wait(oracle, records=RECORDS, kind="box") -> AwaitingLabels:
    with pytest.raises(AwaitingLabels) as waiting:
        oracle.annotate(records, kind)
    return waiting.value


def test_a_batch_is_exported_with_predictions_then_answered_from_the_export(tmp_path):
    waiting = wait(human(tmp_path))
    folder = tmp_path / "run/annotation/batch_01_part0"
    assert (waiting.folder, waiting.waiting, waiting.total) == (folder, 3, 3)
    state = json.loads((tmp_path / "run/awaiting_labels.json").read_text())
    assert state["state"] == "awaiting_labels" and state["waiting"] == ["a", "b", "c"]
    task = json.loads((folder / "labelstudio_tasks.json").read_text())[0]
    assert task["predictions"][0]["result"][0]["value"]["rectanglelabels"] == ["WBC"]
    assert (folder / "images.txt").read_text().splitlines() == [str(r.file) for r in RECORDS]
    path = tmp_path / "ls.json"
    path.write_text(json.dumps(labelstudio_export(folder, TRUTH, CLASSES, seconds=5.0)))
    answers = human(tmp_path, labels=str(path)).annotate(RECORDS, "box")
    assert [a.image_id for a in answers] == ["a", "b", "c"] and answers[0].cost_s == 5.0
    np.testing.assert_allclose(answers[0].boxes, TRUTH["a"].boxes, atol=1e-4)
    assert not (tmp_path / "run/awaiting_labels.json").exists()
    # a later process answers the same batch from what was imported, without the export
    again = human(tmp_path).annotate(RECORDS, "box")
    assert [a.to_json() for a in again] == [a.to_json() for a in answers]


def test_a_bad_or_incomplete_export_imports_nothing_and_the_run_still_awaits(tmp_path):
    folder = wait(human(tmp_path)).folder
    export = labelstudio_export(folder, TRUTH, CLASSES, skip={"b"})
    path = tmp_path / "ls.json"
    path.write_text(json.dumps(export))
    with pytest.raises(AlrunError) as err:
        human(tmp_path, labels=str(path)).annotate(RECORDS, "box")
    assert str(err.value) == (
        f"oracle.labels: {path}: 1 of 3 selected images have no labels (first: 'b'); expected "
        "every image of batch_01_part0, or oracle.partial=ok to import these and wait for the rest"
    )
    export[0]["annotations"][0]["result"][0]["value"]["rectanglelabels"] = ["Dog"]
    path.write_text(json.dumps(export))
    with pytest.raises(AlrunError, match="unknown class 'Dog'"):
        human(tmp_path, labels=str(path), partial="ok").annotate(RECORDS, "box")
    assert not (folder / "answers.json").exists()
    assert json.loads((tmp_path / "run/awaiting_labels.json").read_text())["waiting"] == [
        "a",
        "b",
        "c",
    ]


def test_partial_ok_imports_part_and_waits_for_the_rest_dropped_into_the_folder(tmp_path):
    folder = wait(human(tmp_path)).folder
    path = tmp_path / "part.json"
    path.write_text(json.dumps(labelstudio_export(folder, TRUTH, CLASSES, skip={"b"})))
    waiting = wait(human(tmp_path, labels=str(path), partial="ok"))
    assert (waiting.waiting, waiting.total) == (1, 3)
    assert sorted(json.loads((folder / "answers.json").read_text())) == ["a", "c"]
    rest = json.loads((folder / "labelstudio_tasks_remaining.json").read_text())
    assert [t["data"]["image_id"] for t in rest] == ["b"]
    (folder / "export/full.json").write_text(json.dumps(labelstudio_export(folder, TRUTH, CLASSES)))
    answers = human(tmp_path).annotate(RECORDS, "box")
    assert [len(a.boxes) for a in answers] == [2, 0, 1]


def test_another_selection_for_an_exported_batch_is_refused(tmp_path):
    wait(human(tmp_path))
    with pytest.raises(
        AlrunError, match="now asks for other images or another kind than the batch"
    ):
        human(tmp_path).annotate(RECORDS[:2], "box")


def test_settings_and_kinds(tmp_path):
    with pytest.raises(AlrunError, match="oracle.partial: expected no|ok"):
        HumanOracle(SimulatedOracle(CostModel()), partial="maybe")
    with pytest.raises(AlrunError, match="oracle.labels: .*nope.json: no such file"):
        HumanOracle(SimulatedOracle(CostModel()), labels=str(tmp_path / "nope.json"))
    oracle = human(tmp_path)
    assert "extreme" not in oracle.kinds
    with pytest.raises(AlrunError, match="asks for 'extreme' labels, which oracle=human cannot"):
        oracle.require(["extreme"], "supervision (Extreme)")


@pytest.mark.integration  # two CLI runs (~15 s)
def test_cli_exits_0_with_what_to_do_then_refuses_a_bad_export_in_one_line(tmp_path):
    run = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "alrun.cli",
        "experiment=smoke",
        "oracle=human",
        f"hydra.run.dir={run}",
    ]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    folder = run / "annotation/batch_00_part0"
    assert "alrun: awaiting labels: batch 0 (box), 10 of 10 images" in done.stdout
    assert f"{folder / 'labelstudio_tasks.json'}" in done.stdout
    assert (
        f"alrun experiment=smoke oracle=human hydra.run.dir={run} oracle.labels=<export.json>"
    ) in done.stdout
    bad = tmp_path / "bad.json"
    bad.write_text("[]")
    done = subprocess.run(
        [*cmd, f"oracle.labels={bad}"], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"alrun: error: oracle.labels: {bad}: 10 of 10 selected images have no labels (first: "
        f"'{json.loads((folder / 'manifest.json').read_text())['images'][0]['image_id']}'); "
        "expected every image of batch_00_part0, or oracle.partial=ok to import these and wait "
        "for the rest",
        "  see docs/annotators.md",
    ]
    assert (run / "awaiting_labels.json").exists() and not (folder / "answers.json").exists()


def test_verification_goes_out_in_two_parts_verify_then_draw_the_rejected(tmp_path):
    proposals = {r.image_id: d for r, d in zip(RECORDS, Model().predict(RECORDS, None))}
    folder = wait_verify(human(tmp_path), proposals).folder
    assert folder.name == "batch_01_part0"
    export = labelstudio_export(folder, TRUTH, CLASSES)
    for task in export:  # "a" keeps its proposal, "b" and "c" reject theirs
        kept = task["predictions"][0]["result"] if task["data"]["image_id"] == "a" else []
        task["annotations"][0]["result"] = kept
    (folder / "export/verify.json").write_text(json.dumps(export))
    oracle = human(tmp_path)
    answers = oracle.annotate(RECORDS, "verify", proposals=proposals)
    assert [a.verified.tolist() for a in answers] == [[True], [False], [False]]
    rejected = [r for r, a in zip(RECORDS, answers) if not a.verified.all()]
    with pytest.raises(AwaitingLabels) as waiting:
        oracle.annotate(rejected, "box")
    assert waiting.value.folder.name == "batch_01_part1" and waiting.value.total == 2


def wait_verify(oracle, proposals) -> AwaitingLabels:
    with pytest.raises(AwaitingLabels) as waiting:
        oracle.annotate(RECORDS, "verify", proposals=proposals)
    return waiting.value


def test_only_the_human_oracle_is_told_where_the_loop_is(tmp_path):
    """The loop tells a batched oracle its run directory and batch through a declared protocol;
    the simulated oracle is not one and the calls leave it untouched."""
    simulated = SimulatedOracle(CostModel())
    oracle = HumanOracle(simulated, labels=None, partial="no")
    oracle.check_data(SimpleNamespace(classes=CLASSES))
    assert isinstance(oracle, BatchedOracle) and not isinstance(simulated, BatchedOracle)
    attach_oracle(oracle, tmp_path / "run")
    begin_oracle_batch(oracle, 1, Model())
    assert wait(oracle).batch == 1  # exported as batch 1 under the attached run directory
    assert (tmp_path / "run").is_dir()
    before = dict(vars(simulated))
    attach_oracle(simulated, tmp_path / "other")
    begin_oracle_batch(simulated, 2)
    assert vars(simulated) == before and not (tmp_path / "other").exists()
