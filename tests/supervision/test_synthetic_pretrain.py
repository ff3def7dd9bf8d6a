"""Synthetic pre-training: tensor transfer on hand-made state dicts, the cache keyed by config,
the pre-trained weights really being the start, and one round end to end (synthetic -> BCCD)."""

from __future__ import annotations

import json

import pytest
import torch

from alrun.detectors.base import TrainSchedule
from alrun.errors import AlrunError
from alrun.loop import build_experiment, run_experiment
from alrun.pool import LabelPool
from alrun.supervision import synthetic
from alrun.supervision.synthetic import SyntheticPretrain, transfer_matching
from tests.helpers import compose_config, shared_dataset


def test_transfer_matching_loads_same_name_and_shape_only():
    target = {"a": torch.zeros(2), "head": torch.zeros(3, 4), "only_here": torch.zeros(1)}
    pretrained = {"a": torch.ones(2), "head": torch.ones(5, 4), "extra": torch.ones(1)}
    merged, loaded, kept = transfer_matching(target, pretrained)
    assert loaded == ["a"] and kept == ["head", "only_here"]
    assert merged["a"].tolist() == [1.0, 1.0] and merged["head"].sum() == 0


def test_bad_pretrain_settings_are_one_line_errors():
    with pytest.raises(AlrunError, match=r"^supervision\.iterations: expected a positive integer"):
        SyntheticPretrain(iterations=0)
    with pytest.raises(AlrunError, match=r"^supervision\.domain"):
        SyntheticPretrain(domain="mars")


def _experiment(tmp_path, *extra):
    return compose_config([
        "experiment=smoke", "quiet=true", "budget.rounds=1", "supervision=synthetic_pretrain",
        "supervision.num_images=8", "supervision.iterations=3", "supervision.warmup_iters=1",
        "supervision.image_size=64", f"supervision.cache_dir={tmp_path / 'cache'}", *extra,
    ])  # fmt: skip


def test_cache_key_follows_the_config(tmp_path):
    exp = build_experiment(_experiment(tmp_path))
    regime = exp.regime
    same = SyntheticPretrain(8, 64, iterations=3, warmup_iters=1, cache_dir=tmp_path / "cache")
    longer = SyntheticPretrain(8, 64, iterations=4, warmup_iters=1, cache_dir=tmp_path / "cache")
    assert regime.checkpoint_path(exp.detector) == same.checkpoint_path(exp.detector)
    assert regime.checkpoint_path(exp.detector) != longer.checkpoint_path(exp.detector)
    assert regime.checkpoint_path(exp.detector).parent == tmp_path / "cache" / "pretrain"
    other = build_experiment(_experiment(tmp_path, "detector.builder.fpn_channels=32"))
    assert regime.checkpoint_path(other.detector) != regime.checkpoint_path(exp.detector)


def test_round_starts_from_the_cached_pretrained_weights(tmp_path, monkeypatch):
    exp = build_experiment(_experiment(tmp_path))
    pool = LabelPool(exp.splits.pool)
    pool.add(exp.oracle.annotate(pool.records(pool.unlabelled_ids[:4])), 0)
    exp.regime.pretrained_state(exp.detector)  # pre-trains for real (3 iterations) and caches
    no_fine_tune = lambda *a, **k: {"iterations": 0.0}  # noqa: E731
    monkeypatch.setattr(synthetic, "train_with_strategy", no_fine_tune)
    stats = exp.regime.train(exp.detector, pool, TrainSchedule(iterations=1), 5, 0)
    path = exp.regime.checkpoint_path(exp.detector)
    pretrained = torch.load(path, weights_only=True)
    assert json.loads(path.with_suffix(".json").read_text())["schedule"]["iterations"] == 3
    now = exp.detector.state_dict()
    same = [k for k in now if now[k].shape == pretrained[k].shape]
    assert all(torch.equal(now[k], pretrained[k]) for k in same)
    assert stats["pretrain/loaded_tensors"] == len(same) == len(now)  # synthetic: 4 classes both
    assert stats["pretrain/cache_hit"] == 0.0
    fresh = SyntheticPretrain(8, 64, iterations=3, warmup_iters=1, cache_dir=tmp_path / "cache")
    assert (
        fresh.train(exp.detector, pool, TrainSchedule(iterations=1), 5, 0)["pretrain/cache_hit"]
        == 1.0
    )
    # continue mode: round 1 fine-tunes the previous weights, no reload
    assert "pretrain/loaded_tensors" not in fresh.train(
        exp.detector, pool, TrainSchedule(iterations=1), 5, 1
    )


@pytest.mark.integration
@pytest.mark.parametrize("init", ["continue", "scratch"])
def test_one_round_on_bccd_from_synthetic_pretraining(tmp_path, init):
    root = shared_dataset("bccd")
    cfg = _experiment(tmp_path, "dataset=bccd", f"dataset.root={root}", f"trainer.init={init}")
    rows = run_experiment(cfg, tmp_path / "run")
    assert [r["images"] for r in rows] == [10, 20]
    trains = [json.loads((tmp_path / f"run/round_0{r}/metrics.json").read_text())["train"]
              for r in (0, 1)]  # fmt: skip
    # 3 BCCD classes vs 4 synthetic: all but the class-logits weight and bias are transferred
    assert trains[0]["pretrain/kept_tensors"] == 2 and trains[0]["pretrain/loaded_tensors"] > 50
    assert ("pretrain/loaded_tensors" in trains[1]) == (init == "scratch")
    assert len(list((tmp_path / "cache" / "pretrain").glob("*.pt"))) == 1


def _fresh(tmp_path) -> SyntheticPretrain:
    return SyntheticPretrain(8, 64, iterations=3, warmup_iters=1, cache_dir=tmp_path / "cache")


def _spoil_truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _spoil_other_weights(path):
    state = torch.load(path, weights_only=True)
    torch.save({k: torch.zeros_like(v) for k, v in state.items()}, path)  # loads fine: wrong


def _spoil_sidecar(path):
    path.with_suffix(".json").write_text('{"version": 1, "sch')


@pytest.mark.parametrize("spoil", [_spoil_truncate, _spoil_other_weights, _spoil_sidecar])
def test_a_corrupt_cached_pretraining_is_rebuilt_never_reused(tmp_path, spoil, caplog):
    """The cache is shared by every job of a sweep: a corrupt or foreign file is detected (its
    digest is recorded beside it), rebuilt atomically, and never crashes the run."""
    exp = build_experiment(_experiment(tmp_path))
    original = _fresh(tmp_path).pretrained_state(exp.detector)
    path = _fresh(tmp_path).checkpoint_path(exp.detector)
    spoil(path)
    calls = []
    regime = _fresh(tmp_path)
    rebuild = regime._pretrain
    regime._pretrain = lambda detector: calls.append(1) or rebuild(detector)
    with caplog.at_level("WARNING", logger="alrun"):
        state = regime.pretrained_state(exp.detector)
    assert calls == [1] and not regime._cache_hit
    assert f"synthetic_pretrain: the cached pre-training {path} is unusable" in caplog.text
    assert state.keys() == original.keys()
    assert all(torch.equal(state[k], original[k]) for k in state)  # the same training again
    again = _fresh(tmp_path)
    assert torch.equal(next(iter(again.pretrained_state(exp.detector).values())),
                       next(iter(original.values())))  # fmt: skip
    assert again._cache_hit  # the rebuilt file is trusted again
    assert not list(path.parent.glob(".*.tmp"))  # atomic writes leave no temp file
