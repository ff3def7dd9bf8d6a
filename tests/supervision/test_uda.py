"""UDA: gradient reversal, the domain classifier's loss and votes, start-up errors, and one round
end to end on the synthetic domains (and TXL-PBC's Raabin -> BCCD when the data is there)."""

from __future__ import annotations

import json

import pytest
import torch

from alrun.errors import AlrunError
from alrun.loop import build_experiment, run_experiment
from alrun.supervision.grl import grl_schedule, reverse_gradient
from alrun.supervision.uda import DomainAdaptation, domain_loss_and_votes
from tests.helpers import compose_config, shared_dataset
from tests.supervision._cli import alrun_errors


def test_gradient_reversal_flips_the_gradient_sign():
    x = torch.tensor([1.0, -2.0, 3.0], requires_grad=True)
    w = torch.tensor([0.5, 1.0, -4.0])
    y = reverse_gradient(x, 0.3)
    assert torch.equal(y, x)  # identity forward
    (y * w).sum().backward()
    assert x.grad.tolist() == pytest.approx((-0.3 * w).tolist())
    x.grad = None
    (x * w).sum().backward()  # without the layer: the plain gradient
    assert x.grad.tolist() == pytest.approx(w.tolist())


def test_grl_schedule_ramps_from_zero_to_one():
    assert grl_schedule(0.0) == 0.0
    assert 0.0 < grl_schedule(0.1) < grl_schedule(0.5) < grl_schedule(1.0) <= 1.0
    assert grl_schedule(1.0) == pytest.approx(1.0, abs=1e-4)


def test_domain_loss_and_votes_on_hand_made_logits():
    logits = [torch.tensor([[4.0, 2.0], [-3.0, -1.0]]), torch.tensor([[0.0], [-1.0]])]
    loss, says_target = domain_loss_and_votes(logits, is_target=1.0)
    flat = torch.tensor([[4.0, 2.0, 0.0], [-3.0, -1.0, -1.0]])
    expected = torch.nn.functional.softplus(-flat).mean()  # BCE with label 1
    assert float(loss) == pytest.approx(float(expected))
    assert says_target.tolist() == [True, False]


@pytest.mark.integration
def test_uda_without_target_domain_is_one_line_at_start_up(tmp_path):
    out = tmp_path / "run"
    code, errors = alrun_errors("experiment=smoke", "supervision=uda", f"hydra.run.dir={out}")
    assert code == 2 and len(errors) == 1
    assert errors[0].startswith("alrun: error: supervision.target_domain: uda needs the target")
    assert not (out / "state.json").exists() and not list(out.glob("round_*"))


def test_uda_start_up_checks():
    with pytest.raises(AlrunError, match=r"^supervision\.source: uda needs"):
        DomainAdaptation(source=None, target_domain="target")
    with pytest.raises(AlrunError, match=r"supervision\.pseudo_threshold: expected a number in"):
        DomainAdaptation(source={}, target_domain="target", pseudo_threshold=-0.5)
    # the dataset (pool and test) must be the target domain
    cfg = compose_config([*TINY, "dataset.domain=source"])
    with pytest.raises(AlrunError, match="dataset's pool images come from domain"):
        build_experiment(cfg)


TINY = [
    "experiment=uda_synthetic",
    "quiet=true",
    "dataset.max_pool_images=40",
    "dataset.max_test_images=16",
    "detector.builder.image_size=96",
    "supervision.source.num_pool=24",
    "budget.initial=8",
    "budget.per_round=8",
    "budget.rounds=1",
    "trainer.iterations=4",
    "trainer.first_iterations=6",
    "trainer.warmup_iters=2",
    "supervision.pseudo_threshold=0.1",
]


@pytest.mark.integration
@pytest.mark.parametrize("init", ["continue", "scratch"])
def test_one_round_on_synthetic_domains_records_alignment_and_pseudo_labels(tmp_path, init):
    rows = run_experiment(compose_config([*TINY, f"trainer.init={init}"]), tmp_path)
    assert [r["images"] for r in rows] == [8, 16]
    for r in (0, 1):
        train = json.loads((tmp_path / f"round_0{r}/metrics.json").read_text())["train"]
        assert 0.0 <= train["domain/accuracy"] <= 1.0
        assert 0.0 <= train["domain/accuracy_last"] <= 1.0
        assert train["pseudo/threshold"] == 0.1 and train["pseudo/images"] > 0
        assert train["target_labels_used"] == 1.0
    picked = json.loads((tmp_path / "round_00/selection.json").read_text())["selected"]
    assert len(picked) == 8 and all(p["image_id"].startswith("target_pool_") for p in picked)
    labelled = json.loads((tmp_path / "round_01/labelled.json").read_text())["images"]
    assert all(im["alrun_id"].startswith("target_pool_") for im in labelled)  # source not bought


def test_source_only_baseline_trains_without_target_labels_or_alignment(tmp_path):
    baseline = ["supervision.use_target_labels=false", "supervision.adversarial_weight=0",
                "supervision.pseudo_weight=0"]  # fmt: skip
    cfg = compose_config([*TINY, "budget.rounds=0", *baseline])
    run_experiment(cfg, tmp_path)
    train = json.loads((tmp_path / "round_00/metrics.json").read_text())["train"]
    assert train["target_labels_used"] == 0.0
    assert not any(k.startswith(("domain/", "pseudo/")) for k in train)


@pytest.mark.integration
def test_one_round_on_txl_pbc_raabin_to_bccd(tmp_path):
    root = shared_dataset("txl_pbc")
    cfg = compose_config([
        "experiment=uda_txl", "quiet=true", f"dataset.root={root}",
        "dataset.max_pool_images=16", "dataset.max_test_images=6",
        "supervision.source.max_pool_images=12", "detector.builder.image_size=96",
        "budget.initial=4", "budget.per_round=4", "budget.rounds=1",
        "trainer.iterations=2", "trainer.first_iterations=3", "trainer.warmup_iters=1",
        "trainer.batch_size=4",
    ])  # fmt: skip
    rows = run_experiment(cfg, tmp_path)
    assert [r["images"] for r in rows] == [4, 8]
    train = json.loads((tmp_path / "round_01/metrics.json").read_text())["train"]
    assert 0.0 <= train["domain/accuracy"] <= 1.0
    lines = (root / "domains.csv").read_text().splitlines()[1:]
    domain_of = {row.split(",")[0].rsplit(".", 1)[0]: row.split(",")[4] for row in lines}
    splits = json.loads((tmp_path / "splits.json").read_text())
    picked = json.loads((tmp_path / "round_00/selection.json").read_text())["selected"]
    assert {domain_of[i] for i in splits["pool"]["ids"] + splits["test"]["ids"]} == {"BCCD"}
    assert {domain_of[p["image_id"]] for p in picked} == {"BCCD"}


@pytest.mark.integration
def test_txlpbc_uda_lite0_preset_runs_on_the_pretrained_detector(tmp_path):
    """experiment=txlpbc_uda_lite0 shrunk: source boxes, pseudo-labels and alignment on the
    cached Lite0 features; the classifier reads the FPN, the teacher shares the cache."""
    root = shared_dataset("txl_pbc")
    cfg = compose_config([
        "experiment=txlpbc_uda_lite0", "quiet=true", f"dataset.root={root}",
        "dataset.max_pool_images=12", "dataset.max_test_images=4",
        "supervision.source.max_pool_images=8", "detector.builder.image_size=64",
        f"detector.builder.cache_dir={tmp_path / 'cache'}",
        "budget.initial=4", "budget.per_round=4", "budget.rounds=1",
        "trainer.iterations=2", "trainer.first_iterations=3", "trainer.warmup_iters=1",
        "trainer.batch_size=4", "supervision.pseudo_threshold=0.0",
    ])  # fmt: skip
    rows = run_experiment(cfg, tmp_path / "run")
    assert [r["images"] for r in rows] == [4, 8]
    train = json.loads((tmp_path / "run/round_01/metrics.json").read_text())["train"]
    assert 0.0 <= train["domain/accuracy"] <= 1.0 and train["target_labels_used"] == 1.0
    assert any(k.startswith("pseudo/") for k in train)
    assert any((tmp_path / "cache" / "lite0").rglob("*.pt"))  # source and target features
