"""alrun-calibrate: nnls prices from real seconds, written as a preset the loop composes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from alrun.annotation.calibrate import fit, main, read_records
from alrun.config import compose_config
from alrun.errors import AlrunError

TRUE = {
    "box_s": 8.0,
    "center_click_s": 1.5,
    "verify_s": 0.9,
    "empty_image_s": 2.0,
    "image_label_per_class_s": 1.2,
}


def timed_images(n=800, seed=0):
    """Images labelled by a team whose real prices are TRUE, +-0.5 s of noise."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        kind = ("box", "center_click", "verify", "image_label")[i % 4]
        objects = int(rng.integers(0, 6))
        classes = int(rng.integers(0, 3))
        price = {
            "box": TRUE["box_s"],
            "center_click": TRUE["center_click_s"],
            "verify": TRUE["verify_s"],
        }.get(kind)
        if kind == "image_label":
            seconds = max(classes, 1) * TRUE["image_label_per_class_s"]
        else:
            seconds = objects * price if objects else TRUE["empty_image_s"]
        seconds += rng.normal(0, 0.5)
        out.append({"kind": kind, "objects": objects, "classes": classes, "real_s": seconds})
    return out


def test_nnls_recovers_the_teams_prices_and_beats_the_literature_prices():
    result = fit(timed_images())
    for name, value in TRUE.items():
        assert getattr(result.cost_model, name) == pytest.approx(value, abs=0.15), name
    assert set(result.fitted) == set(TRUE)
    assert result.cost_model.click_first_class_s == 2.4  # nothing informs it: the default
    assert result.rmse_s < 0.6 < result.rmse_before_s


def test_a_times_file_becomes_a_preset_the_loop_composes(tmp_path, monkeypatch, capsys):
    times = tmp_path / "times.jsonl"
    times.write_text("".join(json.dumps(r) + "\n" for r in timed_images()))
    monkeypatch.chdir(tmp_path)
    assert main([str(times), "-o", "configs/cost/team.yaml"]) == 0
    assert "use it with: alrun ... +cost=team" in capsys.readouterr().out
    cfg = compose_config(["+cost=team"])
    assert cfg.oracle.cost_model.box_s == pytest.approx(8.0, abs=0.15)
    assert cfg.oracle.cost_model.click_extra_class_s == 0.9
    assert (
        main([str(times), "-o", "configs/cost/h.yaml", "--key", "oracle.fallback.cost_model"]) == 0
    )
    cfg = compose_config(["oracle=human", "+cost=h"])
    assert cfg.oracle.fallback.cost_model.verify_s == pytest.approx(0.9, abs=0.15)


def test_bad_sources_are_one_line_errors(tmp_path, capsys):
    bad = tmp_path / "t.jsonl"
    bad.write_text('{"kind": "box", "objects": 1, "real_s": 3}\n{oops\n')
    with pytest.raises(
        AlrunError, match=r"t.jsonl line 2: not JSON .*expected one object per line"
    ):
        read_records([bad])
    with pytest.raises(
        AlrunError, match="no annotation/\\*/answers.json; expected an oracle=human run"
    ):
        read_records([tmp_path])
    bad.write_text('{"kind": "extreme", "objects": 1, "real_s": 3}\n')
    with pytest.raises(AlrunError, match="t.jsonl line 1: kind 'extreme'; expected one of box"):
        fit(read_records([bad]))
    bad.write_text('{"kind": "box", "objects": 1, "real_s": null}\n')
    assert main([str(bad)]) == 2
    assert capsys.readouterr().err.startswith("alrun-calibrate: error: calibrate: no image with")
