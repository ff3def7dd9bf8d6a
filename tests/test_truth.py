"""Hidden ground truth out of reach: detectors, strategies and regimes see image references and
the labels bought; only the oracle and the evaluator hold the truth (issue 18)."""

from __future__ import annotations

import dataclasses
import functools
import inspect
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import alrun.loop as loop
from alrun.data.dataset import DatasetSplits, DetectionDataset, ImageRecord, ImageRef, ImageSet
from alrun.detectors.passes import Predictor
from alrun.engine import TrainingHook
from alrun.errors import AlrunError, DatasetError
from alrun.oracle import CostModel, SimulatedOracle
from alrun.pool import LabelPool
from alrun.recorded_oracle import RecordedOracle
from alrun.truth import HiddenTruth, TruthAudit
from tests.helpers import compose_config

SMOKE = ["experiment=smoke", "quiet=true", "budget.rounds=1"]


def _record(image_id: str, boxes, labels, domain: str = "d0") -> ImageRecord:
    return ImageRecord(
        image_id,
        Path(f"{image_id}.png"),
        64,
        48,
        np.asarray(boxes, np.float32).reshape(-1, 4),
        np.asarray(labels, np.int64),
        domain,
        ignore_boxes=np.array([[1, 1, 3, 3]], np.float32),
        ignore_labels=np.array([0]),
    )


RECORDS = (
    _record("a", [[0, 0, 10, 10], [20, 20, 30, 30]], [0, 1]),
    _record("b", [[5, 5, 15, 15]], [1]),
    _record("c", [], []),
)


# --- the split types --------------------------------------------------------------------------


def test_visible_types_have_no_ground_truth_fields():
    dataset = DetectionDataset("toy", ("x", "y"), RECORDS)
    visible = dataset.visible()
    assert isinstance(visible, ImageSet) and visible.ids == ["a", "b", "c"]
    assert visible.classes == ("x", "y") and len(visible) == 3
    ref = visible.by_id()["a"]
    assert ref == ImageRef("a", Path("a.png"), 64, 48, "d0")
    field_names = {f.name for f in dataclasses.fields(ImageRef)}
    assert field_names == {"image_id", "file", "width", "height", "domain"}
    assert visible.subset(["c", "a"], "sub").ids == ["c", "a"]
    with pytest.raises(DatasetError, match=r"toy: unknown image ids \['z'\]"):
        visible.subset(["z"])
    splits = DatasetSplits(dataset.subset(["a", "b"]), dataset.subset(["c"]))
    seen = splits.visible()
    assert seen.classes == ("x", "y") and seen.pool.ids == ["a", "b"] and seen.test.ids == ["c"]
    assert all(isinstance(r, ImageRef) for r in (*seen.pool.images, *seen.test.images))


def test_hidden_truth_and_its_audit():
    truth = HiddenTruth(RECORDS)
    assert len(truth) == 3 and truth["b"] is RECORDS[1] and "z" not in truth
    with pytest.raises(AlrunError, match="hidden truth: no ground truth for image 'z'"):
        truth["z"]
    audit = TruthAudit(truth)
    found = audit.match("a", np.array([[0, 0, 10, 10], [20, 20, 30, 30]]), np.array([0, 0]))
    assert (found.matched, found.objects) == (1, 2) and found.iou_sum == pytest.approx(1.0)
    # boxes of the flipped image (width 64) are matched against the flipped truth
    hit = audit.true_positives(
        "b", torch.tensor([[49.0, 5, 59, 15]]), torch.tensor([1]), torch.tensor([0.9]), 64
    )
    assert (hit.matched, hit.objects) == (1, 1)


def test_the_pool_keeps_references_and_the_oracle_answers_from_its_truth():
    pool = LabelPool(DetectionDataset("toy", ("x", "y"), RECORDS))
    assert all(isinstance(pool.record(i), ImageRef) for i in pool.unlabelled_ids)
    oracle = SimulatedOracle(CostModel(), "box")
    with pytest.raises(AlrunError, match="oracle: no ground truth for image 'a'"):
        oracle.annotate(pool.records(["a"]))
    oracle.hold_truth(HiddenTruth(RECORDS))
    assert oracle.objects(pool.record("a")) == 2
    assert oracle.cost(pool.record("c")) == CostModel().empty_image_s
    pool.add(oracle.annotate(pool.records(["a", "c"])), 0)
    (bought, empty) = pool.training_set().images
    np.testing.assert_array_equal(bought.boxes, RECORDS[0].boxes)
    assert not np.shares_memory(bought.boxes, RECORDS[0].boxes)  # a copy was sold
    assert bought.ignore_boxes is None and len(empty.boxes) == 0


# --- no regime, strategy or detector call receives hidden truth --------------------------------

OPAQUE = (SimulatedOracle, RecordedOracle, TruthAudit)  # the truth's holders


class TruthFinder:
    """Finds hidden truth in a call's arguments: a truth record, the truth store, or an array
    or tensor sharing memory with a truth array (a view handed on instead of a copy)."""

    def __init__(self, records):
        self.records = {id(r) for r in records}
        arrays = [
            a
            for r in records
            for a in (r.boxes, r.labels, r.ignore_boxes, r.ignore_labels, r.areas)
            if a is not None and a.size
        ]
        self.spans = [(a.__array_interface__["data"][0], a.nbytes) for a in arrays]

    def _overlaps(self, start: int, size: int) -> bool:
        return any(start < s + n and s < start + size for s, n in self.spans)

    def find(self, value, path: str = "", seen: set[int] | None = None) -> str | None:
        seen = set() if seen is None else seen
        if id(value) in seen or value is None or isinstance(value, (str, bytes, int, float)):
            return None
        seen.add(id(value))
        if id(value) in self.records or isinstance(value, HiddenTruth):
            return path or type(value).__name__
        if isinstance(value, OPAQUE) or isinstance(value, nn.Module):
            return None
        if isinstance(value, np.ndarray):
            span = (value.__array_interface__["data"][0], value.nbytes)
            return path if value.size and self._overlaps(*span) else None
        if isinstance(value, torch.Tensor):
            if value.device.type == "cpu" and value.numel():
                return path if self._overlaps(value.data_ptr(), value.nbytes) else None
            return None
        if isinstance(value, dict):
            children = list(value.items())
        elif isinstance(value, (list, tuple, set, frozenset)):
            children = list(enumerate(value))
        elif inspect.isfunction(value):
            cells = value.__closure__ or ()
            children = [(f"<cell {i}>", c.cell_contents) for i, c in enumerate(cells)]
        elif inspect.ismethod(value):
            children = [("__self__", value.__self__)]
        elif isinstance(value, functools.partial):
            children = [("args", value.args), ("keywords", value.keywords)]
        elif type(value).__module__.startswith("alrun") and hasattr(value, "__dict__"):
            children = list(vars(value).items())
        else:
            return None
        for key, child in children:
            found = self.find(child, f"{path}.{key}", seen)
            if found:
                return found
        return None


def _watch(monkeypatch, cls: type, finder: TruthFinder, calls: list[str], leaks: list[str]):
    """Every public method ``cls`` defines or inherits from alrun checks its arguments."""
    names = {n for k in cls.__mro__ if k.__module__.startswith("alrun") for n in vars(k)}
    for name in sorted(names):
        method = inspect.getattr_static(cls, name)
        if name.startswith("_") or not inspect.isfunction(method):
            continue

        def watched(*args, __method=method, __name=f"{cls.__name__}.{name}", **kwargs):
            calls.append(__name)
            found = finder.find((args[1:], kwargs))  # args[0]: the object itself
            if found:
                leaks.append(f"{__name} received hidden truth at {found}")
            return __method(*args, **kwargs)

        monkeypatch.setattr(cls, name, watched)


def _hook_classes(base=TrainingHook):
    for sub in base.__subclasses__():
        yield sub
        yield from _hook_classes(sub)


def _run_watched(monkeypatch, tmp_path, overrides):
    """One small round with every regime, strategy (scorer, selector), detector, predictor and
    training-hook method watched; returns (calls, leaks)."""
    calls: list[str] = []
    leaks: list[str] = []
    build = loop.build_experiment

    def build_watched(cfg):
        exp = build(cfg)
        finder = TruthFinder((*exp.splits.pool.images, *exp.splits.test.images))
        assert finder.find(exp.splits.pool) and finder.find(exp.truth)  # the finder finds
        classes = {type(exp.detector), type(exp.regime), type(exp.strategy), Predictor}
        classes |= {type(exp.strategy.scorer), type(exp.strategy.selector)}
        classes |= set(_hook_classes())
        for cls in classes:
            if cls.__module__.startswith("alrun"):
                _watch(monkeypatch, cls, finder, calls, leaks)
        return exp

    monkeypatch.setattr(loop, "build_experiment", build_watched)
    loop.run_experiment(compose_config([*SMOKE, *overrides]), tmp_path)
    return calls, leaks


def test_the_finder_finds_truth_handed_on():
    finder = TruthFinder(RECORDS)
    assert finder.find({"x": [RECORDS[0]]}) == ".x.0"
    assert finder.find((RECORDS[1].boxes[:1],)) == ".0"  # a view
    assert finder.find(torch.as_tensor(RECORDS[0].boxes)) is not None  # shares the memory
    assert finder.find(LabelPool(DetectionDataset("t", ("x", "y"), RECORDS))) is None
    assert finder.find(RECORDS[0].boxes.copy()) is None and finder.find(RECORDS[0].ref) is None
    lookup = HiddenTruth(RECORDS).__getitem__
    assert finder.find(lookup) == ".__self__"  # a closure or a bound method of the store


@pytest.mark.integration  # a smoke round, ~10 s on 2 shared cores
def test_no_call_receives_hidden_truth_in_a_full_supervision_round(monkeypatch, tmp_path):
    calls, leaks = _run_watched(monkeypatch, tmp_path, ["strategy=entropy"])
    assert not leaks, leaks
    for expected in ("FullSupervision.train", "FullSupervision.annotate", "Strategy.select"):
        assert expected in calls, expected
    assert any(c.endswith(".predict") for c in calls)


REGIMES = {
    "box_verification": [],
    "consistency": [],
    "extreme": [],
    "image_level": [],
    "pseudo_label": ["supervision.threshold=0.0"],  # any box of the weak smoke teacher
    "synthetic_pretrain": [
        "supervision.iterations=5",
        "supervision.num_images=16",
        "supervision.warmup_iters=1",
    ],
    "uda": [  # the synthetic generator's two domains, smoke-sized (as the fault drill)
        "dataset.domain=target",
        "supervision.target_domain=target",
        "supervision.pseudo_threshold=0.0",
        "supervision.source={_target_:alrun.data.synthetic.synthetic_splits,num_pool:8,"
        "num_test:1,image_size:${dataset.image_size},domain:source,"
        "data_seed:${dataset.data_seed},cache_dir:${dataset.cache_dir}}",
    ],
    "weak_point": [],
    "weak_point_hard": [],
    "weak_point_soft": [],
}


@pytest.mark.integration  # ~5-15 s each
@pytest.mark.parametrize("regime", sorted(REGIMES))
def test_no_regime_call_receives_hidden_truth(monkeypatch, tmp_path, regime):
    overrides = [f"supervision={regime}", "strategy=entropy", *REGIMES[regime]]
    calls, leaks = _run_watched(monkeypatch, tmp_path, overrides)
    assert not leaks, leaks
    assert any(c.endswith(".train") for c in calls)


# one strategy per scorer family / pass source / selector kind
STRATEGIES = {
    "random": [],
    "least_confidence": [],
    "mc_entropy": [],
    "ensemble_bald": ["strategy.scorer.members=2"],
    "tta_inconsistency": [],
    "al_mdn": [],
    "loss_prediction": [],
    "ppal": [],
    "coreset": [],
    "badge": [],
    "cald": [],
    "ccms": [],
    "loc_stability": [],
    "failure_aware": [],
    "weighted": [],
}


@pytest.mark.integration  # ~5-15 s each
@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_no_strategy_call_receives_hidden_truth(monkeypatch, tmp_path, strategy):
    overrides = [f"strategy={strategy}", *STRATEGIES[strategy]]
    calls, leaks = _run_watched(monkeypatch, tmp_path, overrides)
    assert not leaks, leaks
    assert any(c.startswith("Strategy.") for c in calls)
