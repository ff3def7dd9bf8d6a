"""Streaming acquisition (issue 22): the pool predicted in shards gives exactly the scores,
selections, selection records and pool misses of the whole-pool step, for every strategy
preset; shard sizes are checked before anything is written; preds.npz streams to disk."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from alrun.errors import AlrunError
from alrun.loop import build_experiment, derive_seed, initial_selection, run_experiment
from alrun.pool import LabelPool
from alrun.progress import Reporter
from alrun.rundir import RunOptions, config_fingerprint
from alrun.seeding import Purpose
from alrun.selection import select_round, selection_pool_misses
from alrun.streaming import batch_unit, shard_length, stream_round
from alrun.supervision.base import LabelRequest
from scripts.bench_pool import zero_score_thresholds
from tests.helpers import REPO, compose_config

#: 26 pool images after the initial 6; prediction batches of 4, shards of 6 -> 8 (4 shards)
TINY = [
    "experiment=smoke",
    "quiet=true",
    "dataset.max_pool_images=32",
    "dataset.max_test_images=4",
    "budget.initial=6",
    "budget.per_round=3",
    "budget.rounds=1",
    "trainer.iterations=2",
    "trainer.first_iterations=2",
    "trainer.batch_size=2",
    "detector.builder.image_size=64",
    "detector.predict_batch_size=4",
]
SHARD = 6
PRESETS = sorted(p.stem for p in (REPO / "alrun/configs/strategy").glob("*.yaml"))
#: the fast tier's subset (~4 s each): per-image scores, multi-pass, two-phase with a second
#: pass; the embeddings and weighted-sum modes are in the integration tier with the rest
FAST = ("entropy", "mc_entropy", "ppal")
#: presets whose defaults ask for more than a 64-px tiny model offers, made to fit
FIT = {
    "mc_entropy": ["strategy.scorer.passes=3"],
    "mc_margin": ["strategy.scorer.passes=3"],
    "mc_variation_ratio": ["strategy.scorer.passes=3"],
    "bald": ["strategy.scorer.passes=3"],
    "ensemble_bald": ["strategy.scorer.members=2"],
    "ensemble_entropy": ["strategy.scorer.members=2"],
    "ensemble_box_disagreement": ["strategy.scorer.members=2"],
    "loss_prediction": ["strategy.scorer.hidden=8"],
    "loc_tightness": [  # proposals: a two-stage model, untrained, at the tiny images' size
        "detector=fasterrcnn_mobilenet_v3_large_320_fpn",
        "detector.builder.min_size=64",
        "detector.builder.max_size=64",
        "detector.predict_batch_size=4",
        "+detector.builder.box_score_thresh=0.0",
    ],
    "qbc": ["strategy.scorer.low=0.0"],  # the untrained members' scores are all below 0.1
}
#: scores with one value on a 2-iteration model (has_detection: every image has a box at
#: threshold 0; variation ratio: its box labels do not change across dropout passes)
COARSE = ("has_detection", "mc_variation_ratio")


def _trained(preset: str, *overrides: str, keep_every_box: bool = True):
    """A run's state after round 0 trained (strategy hooks included), before its selection."""
    fit = FIT.get(preset, [])
    tiny = [o for o in TINY if not (o.startswith("detector.builder") and "detector=" in str(fit))]
    cfg = compose_config([*tiny, f"strategy={preset}", *fit, *overrides])
    if keep_every_box:
        # a 2-iteration model's boxes score ~0.01: with the presets' thresholds every image
        # would be empty (one score for all: a comparison that sees nothing)
        zero_score_thresholds(cfg.strategy)
    exp = build_experiment(cfg)
    pool = LabelPool(exp.splits.pool.visible())
    picked = initial_selection(exp, pool)
    pool.add(exp.regime.annotate(exp.oracle, pool.records(picked), LabelRequest(0)), 0)
    seed = derive_seed(exp.seed, 0, Purpose.TRAIN)
    exp.regime.train(exp.detector, pool, exp.schedule, seed, 0, None, strategy=exp.training)
    return exp, pool


def _record(exp, pool, acquired) -> dict:
    sel = acquired.selection
    return {
        "scores": acquired.scores,
        "picked": sel.image_ids,
        "picked_scores": sel.scores,
        "costs": sel.costs,
        "method": json.loads(json.dumps(sel.method, default=str)),
        "stopped": acquired.stopped,
        "misses": selection_pool_misses(exp, pool, acquired),
    }


def _same(a, b) -> bool:
    """Equal, NaN equal to NaN (exact otherwise: no tolerance)."""
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _compare(preset: str) -> None:
    exp, pool = _trained(preset)
    request = LabelRequest(1, (), exp.detector)
    whole = _record(exp, pool, select_round(exp, pool, 0, Reporter(True), request))
    streamed = stream_round(exp, pool, 0, Reporter(True), request, SHARD)
    shards = _record(exp, pool, streamed)
    assert whole["picked"], f"{preset}: nothing picked, the comparison would be empty"
    finite = {v for v in whole["scores"].values() if math.isfinite(v)}
    assert len(finite) >= 2 or preset in COARSE, f"{preset}: one score for all: nothing compared"
    for key in whole:
        assert _same(whole[key], shards[key]), f"{preset}: {key} differs"
    assert streamed.preds is None and streamed.batch is None  # nothing held per box


@pytest.mark.parametrize("preset", FAST)
def test_streamed_step_equals_whole_pool_step(preset: str):
    _compare(preset)


#: box-level queries rank boxes across the whole pool: alrun.streaming.acquire gives them the
#: whole-pool step (test below), so there is no streamed step to compare
WHOLE_POOL_ONLY = ("compas",)


@pytest.mark.integration
@pytest.mark.parametrize("preset", [p for p in PRESETS if p not in FAST + WHOLE_POOL_ONLY])
def test_streamed_step_equals_whole_pool_step_for_every_preset(preset: str):
    _compare(preset)


def test_box_level_queries_take_the_whole_pool_step(monkeypatch, tmp_path):
    import alrun.streaming as streaming
    from alrun.acquisition.compas import BoxQueryStrategy, ComPASScorer
    from alrun.rundir import RunOptions

    monkeypatch.setattr(streaming, "select_round", lambda *args: ("whole", args[0].strategy))
    monkeypatch.setattr(streaming, "stream_round", lambda *args: ("streamed", None))
    exp = SimpleNamespace(strategy=BoxQueryStrategy("compas", ComPASScorer()))
    options = RunOptions(shard_size=8)
    assert streaming.acquire(options, exp, None, 1, None, None, tmp_path) == (
        "whole",
        exp.strategy,
    )


def test_shards_cut_inside_a_prediction_batch_would_change_mc_dropout_scores(monkeypatch):
    """Why shards are cut at whole prediction batches: MC-dropout masks are seeded by the
    batch's image ids, so a shard boundary inside a batch changes the scores (and the
    equality tests above would see it)."""
    import alrun.streaming

    exp, pool = _trained("mc_entropy")
    request = LabelRequest(1, (), exp.detector)
    whole = select_round(exp, pool, 0, Reporter(True), request).scores
    monkeypatch.setattr(alrun.streaming, "batch_unit", lambda exp, needs: 1)
    misaligned = stream_round(exp, pool, 0, Reporter(True), request, SHARD).scores
    assert whole.keys() == misaligned.keys() and whole != misaligned


def test_shards_are_cut_at_whole_prediction_batches():
    exp = build_experiment(compose_config(TINY))
    unit = batch_unit(exp, exp.strategy.needs)
    assert unit == 4
    assert [shard_length(s, unit) for s in (1, 4, 6, 8, 9)] == [4, 4, 8, 8, 12]
    tta = build_experiment(compose_config([*TINY, "strategy=tta_inconsistency"]))
    assert batch_unit(tta, tta.strategy.needs) == 16  # views are predicted 16 at a time


@pytest.mark.parametrize("bad", [0, -3, 2.5, "8", True])
def test_bad_shard_size_is_one_line_naming_the_key_and_nothing_is_written(tmp_path, bad):
    cfg = compose_config([*TINY, f"acquisition.shard_size={json.dumps(bad)}"])
    with pytest.raises(AlrunError) as err:
        run_experiment(cfg, tmp_path / "run")
    message = str(err.value)
    assert "acquisition.shard_size" in message and "\n" not in message
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_shard_size_null_is_the_whole_pool_step_and_a_resume_may_change_it():
    default = compose_config(TINY)
    assert RunOptions.from_config(default).shard_size == 1024
    cfg = compose_config([*TINY, "acquisition.shard_size=null"])
    assert RunOptions.from_config(cfg).shard_size is None
    assert config_fingerprint(cfg) == config_fingerprint(default)  # run control


def _preds(run: Path) -> dict[str, np.ndarray]:
    with np.load(run / "round_00" / "preds.npz") as data:
        return {k: data[k] for k in data.files}


@pytest.mark.integration  # two runs, ~7 s (the writer itself: tests/test_prediction_file.py)
def test_saved_predictions_stream_to_the_same_file(tmp_path):
    """save_predictions=true writes shard by shard a preds.npz equal to the whole pool's."""
    base = [*TINY, "save_predictions=true", "trainer.iterations=1"]
    run_experiment(compose_config([*base, "acquisition.shard_size=null"]), tmp_path / "whole")
    run_experiment(compose_config([*base, f"acquisition.shard_size={SHARD}"]), tmp_path / "shards")
    runs = ("whole", "shards")
    whole, shards = (_preds(tmp_path / r) for r in runs)
    assert whole.keys() == shards.keys() >= {"image_ids", "image_scores", "offsets", "probs"}
    for name in whole:
        assert whole[name].dtype == shards[name].dtype, name
        np.testing.assert_array_equal(whole[name], shards[name], err_msg=name)
    assert len(whole["image_ids"]) == 26 and whole["offsets"][-1] == len(whole["boxes"]) > 0
    leftovers = [p.name for p in (tmp_path / "shards" / "round_00").iterdir()]
    assert not [n for n in leftovers if n.startswith(".preds")]  # the raw shard files are gone
    selections = [(tmp_path / r / "round_00" / "selection.json").read_text() for r in runs]
    assert selections[0] == selections[1]
