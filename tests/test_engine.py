"""The training engine: schedule, init policy, batch sources, loss hooks, hook failures."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from alrun.data.dataset import DetectionDataset, ImageRecord
from alrun.detectors.base import Detector, TrainSchedule
from alrun.engine import (
    BatchSource,
    TrainingHook,
    TrainingHookError,
    batch_plan,
    train,
    train_round,
    warmup_cosine,
    warmup_step,
)
from alrun.errors import AlrunError
from alrun.types import Detections

PLAIN = dict(momentum=0.0, weight_decay=0.0, grad_clip=0.0, warmup_iters=0, min_lr_ratio=1.0)


class ToyDetector:
    """A one-parameter-vector 'detector': predicts the box count from the mean colour."""

    num_classes = 2
    device = torch.device("cpu")
    head_type = "softmax"
    capabilities: frozenset[str] = frozenset()

    def __init__(self):
        self.resets: list[int] = []
        self.targets_seen: list[list[dict]] = []
        self.weight = torch.nn.Parameter(torch.ones(3))

    def reset(self, seed):
        self.resets.append(seed)
        self.weight = torch.nn.Parameter(
            torch.rand(3, generator=torch.Generator().manual_seed(seed))
        )

    def train_mode(self):
        pass

    def parameters(self):
        return [self.weight]

    def losses(self, images, targets):
        self.targets_seen.append(targets)
        colour = torch.stack([im.mean(dim=(1, 2)) for im in images])
        count = torch.tensor([float(len(t["labels"])) for t in targets])
        return {"count": ((colour * self.weight).sum(1) - count).pow(2).mean()}

    def predict(self, images, needs, progress=None):
        return [Detections.empty(r.image_id) for r in images]

    def state_dict(self):
        return {"weight": self.weight.detach().clone()}

    def load_state_dict(self, state):
        self.weight = torch.nn.Parameter(state["weight"].clone())


def _dataset(root: Path, name: str, n: int, n_boxes: int = 1) -> DetectionDataset:
    records = []
    for i in range(n):
        path = root / f"{name}{i}.png"
        Image.new("RGB", (16, 12), (40 * i % 255, 90, 200)).save(path)
        boxes = np.tile(np.array([[1.0, 2.0, 9.0, 10.0]], np.float32), (n_boxes, 1))
        records.append(ImageRecord(f"{name}{i}", path, 16, 12, boxes, np.zeros(n_boxes, np.int64)))
    return DetectionDataset(name, ("a", "b"), tuple(records))


def test_toy_detector_satisfies_the_protocol():
    assert isinstance(ToyDetector(), Detector)


def test_warmup_then_cosine_to_the_floor():
    schedule = TrainSchedule(iterations=100, lr=0.1, warmup_iters=10, min_lr_ratio=0.05)
    lr_at = warmup_cosine(schedule, 100)
    assert lr_at(0) == pytest.approx(0.01)  # warmup starts at 10 %
    assert lr_at(5) == pytest.approx(0.1 * (0.1 + 0.9 * 0.5))
    assert lr_at(10) == pytest.approx(0.1)
    assert lr_at(55) == pytest.approx(0.1 * (0.05 + 0.95 * 0.5))  # half-way down the cosine
    assert lr_at(100) == pytest.approx(0.005)


def test_step_schedule_matches_mmcv_step_hook_with_linear_warmup():
    """Held against mmcv's ``StepLrUpdaterHook`` (``policy='step'``) with ``warmup='linear'``
    as PPAL's ``configs/voc_active_learning/al_train/retinanet_26e.py`` sets it (lr 0.002, 500
    warmup iterations at ratio 0.001, x0.1 at epoch 20 of 26). mmcv: regular lr = lr x
    gamma^(epochs >= step), warmup lr = regular x (1 - (1 - i / 500) x (1 - 0.001)); 100
    iterations an epoch here, so epoch 20 starts at iteration 2000."""
    schedule = TrainSchedule(
        epochs=26,
        iterations=0,
        lr=0.002,
        warmup_iters=500,
        warmup_ratio=0.001,
        lr_schedule="step",
        lr_steps=[20 / 26],
        gamma=0.1,
    )
    total = schedule.num_iterations(800, from_scratch=True)  # 800 images / batch 8 = 100
    assert total == 2600
    lr_at = warmup_step(schedule, total)
    assert lr_at(0) == pytest.approx(2e-6)  # 0.002 x 0.001
    assert lr_at(250) == pytest.approx(0.002 * (1 - 0.5 * 0.999))  # 0.001001
    assert lr_at(500) == pytest.approx(0.002)
    assert lr_at(1999) == pytest.approx(0.002)
    assert lr_at(2000) == pytest.approx(0.0002)
    assert lr_at(2599) == pytest.approx(0.0002)


def test_step_schedule_by_iteration_index_with_two_milestones():
    schedule = TrainSchedule(
        iterations=10, lr=1.0, warmup_iters=0, lr_schedule="step", lr_steps=[4, 8], gamma=0.5
    )
    assert [warmup_step(schedule, 10)(i) for i in range(10)] == [1.0] * 4 + [0.5] * 4 + [0.25] * 2


def test_engine_trains_with_the_step_schedule(tmp_path):
    """The optimiser runs at the scheduled rate: the spy sees what SGD was given."""
    rates: list[float] = []

    class Spy(TrainingHook):
        def after_step(self, step):
            rates.append(step.lr)

    def run(**kw):
        schedule = TrainSchedule(iterations=6, lr=0.1, **{**PLAIN, **kw})
        detector = ToyDetector()
        train(detector, [BatchSource("l", _dataset(tmp_path, "l", 2))], schedule, 0, hooks=[Spy()])
        return detector.weight.detach().clone()

    stepped = run(lr_schedule="step", lr_steps=[0.5], gamma=0.1)
    assert rates == pytest.approx([0.1] * 3 + [0.01] * 3)
    assert not torch.equal(stepped, run())  # the cosine default (floor 1.0 here) differs


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (dict(lr_steps=[0.5]), "lr_steps: milestones need trainer.lr_schedule=step"),
        (dict(lr_schedule="step"), "lr_steps: expected at least one milestone"),
        (dict(lr_schedule="step", lr_steps=[1.5]), "fractions in \\(0, 1\\) or whole"),
        (dict(lr_schedule="step", lr_steps=[0.8, 0.5]), "expected increasing milestones"),
        (dict(lr_schedule="step", lr_steps=[300]), "milestone 300 is past the last iteration"),
        (dict(lr_schedule="step", lr_steps=[0.5], gamma=0.0), "trainer.gamma: expected in"),
        (dict(lr_schedule="linear"), "trainer.lr_schedule: expected 'cosine' or 'step'"),
    ],
)
def test_bad_step_schedules_are_one_line_naming_the_key(settings, message):
    with pytest.raises(AlrunError, match=message):
        TrainSchedule(iterations=300, **settings)


def test_an_iteration_milestone_past_an_epoch_round_is_refused_when_it_trains():
    schedule = TrainSchedule(epochs=2, iterations=0, lr_schedule="step", lr_steps=[30])
    with pytest.raises(AlrunError, match="trainer.lr_steps: milestone 30 is past this round"):
        warmup_step(schedule, schedule.num_iterations(40, False))  # 2 x 5 = 10 iterations


def test_batch_plan_walks_epochs_and_is_seeded():
    plan = batch_plan(5, 2, 7, torch.Generator().manual_seed(0))
    assert [len(b) for b in plan] == [2, 2, 1, 2, 2, 1, 2]
    assert sorted(i for b in plan[:3] for i, _ in b) == [0, 1, 2, 3, 4]  # one epoch, each once
    assert plan == batch_plan(5, 2, 7, torch.Generator().manual_seed(0))
    assert plan != batch_plan(5, 2, 7, torch.Generator().manual_seed(1))


@pytest.mark.parametrize("batch_size", [-1, 0])
def test_batch_plan_refuses_a_batch_size_below_one_instead_of_looping(batch_size):
    """A negative size made range() empty and the plan never filled: a hang, not an error."""
    with pytest.raises(AlrunError, match=f"batch size must be an integer >= 1, got {batch_size}"):
        batch_plan(10, batch_size, 5, torch.Generator().manual_seed(0))
    with pytest.raises(AlrunError, match="no images"):
        batch_plan(0, 2, 5, torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    "init,resets", [("continue", [True, False, False]), ("scratch", [True, True, True])]
)
def test_init_policy_lives_in_train_round(tmp_path, init, resets):
    data = _dataset(tmp_path, "l", 3)
    detector = ToyDetector()
    schedule = TrainSchedule(iterations=2, first_iterations=4, batch_size=2, init=init)
    for r in range(3):
        detector.resets.clear()
        detector.targets_seen.clear()
        stats = train_round(detector, [BatchSource("labelled", data)], schedule, 10 + r, r)
        assert (detector.resets == [10 + r]) == resets[r]
        assert stats["iterations"] == len(detector.targets_seen) == (4 if resets[r] else 2)


def test_hook_loss_enters_the_gradient_exactly(tmp_path):
    """With a zero backend loss, one SGD step on the hook's |w|^2 gives w * (1 - 2 lr)."""

    class L2(TrainingHook):
        name = "l2"

        def extra_losses(self, step):
            assert set(step.losses) == {"count"}  # the backend's losses come first
            return {"w": step.detector.weight.pow(2).sum()}

    class Zero(ToyDetector):
        def losses(self, images, targets):
            return {"count": self.weight.sum() * 0.0}

    detector = Zero()
    schedule = TrainSchedule(iterations=1, lr=0.1, **PLAIN)
    train(detector, [BatchSource("l", _dataset(tmp_path, "l", 2))], schedule, 0, hooks=[L2()])
    torch.testing.assert_close(detector.weight.detach(), torch.full((3,), 0.8))


def test_sources_roles_weights_and_hook_view(tmp_path):
    """Unlabelled images never carry targets; pseudo losses are weighted and prefixed."""
    seen: list[dict] = []

    class Spy(TrainingHook):
        name = "spy"

        def extra_losses(self, step):
            seen.append({k: (b.targets is None, len(b.images)) for k, b in step.batches.items()})
            self.losses = {k: float(v.detach()) for k, v in step.losses.items()}
            return {}

        def after_training(self):
            return {"steps": len(seen)}

    detector, spy = ToyDetector(), Spy()
    sources = [
        BatchSource("labelled", _dataset(tmp_path, "l", 4), batch_size=2),
        BatchSource("pseudo", _dataset(tmp_path, "p", 3, n_boxes=2), "pseudo", 0.5, 1),
        BatchSource("target", _dataset(tmp_path, "t", 3, n_boxes=3), "unlabelled", batch_size=3),
    ]
    stats = train(detector, sources, TrainSchedule(iterations=3, **PLAIN), 0, hooks=[spy])
    assert seen == [{"labelled": (False, 2), "pseudo": (False, 1), "target": (True, 3)}] * 3
    assert set(spy.losses) == {"count", "pseudo/count"}
    # targets handed to the backend: labelled (1 box each) then pseudo (2 boxes): never 3
    counts = {len(t["labels"]) for batch in detector.targets_seen for t in batch}
    assert counts == {1, 2} and len(detector.targets_seen) == 6
    assert stats["spy/steps"] == 3 and stats["iterations"] == 3
    alone = ToyDetector()
    train(alone, sources[:1], TrainSchedule(iterations=3, **PLAIN), 0)
    assert not torch.equal(alone.weight, detector.weight)  # the pseudo loss moved the weights


def test_pseudo_weight_scales_the_loss(tmp_path):
    class Record(TrainingHook):
        def extra_losses(self, step):
            self.value = float(step.losses["p/count"].detach())
            return {}

    values = []
    for weight in (1.0, 0.25):
        hook = Record()
        sources = [
            BatchSource("l", _dataset(tmp_path, "l", 2)),
            BatchSource("p", _dataset(tmp_path, "p", 2), "pseudo", weight),
        ]
        train(ToyDetector(), sources, TrainSchedule(iterations=1, **PLAIN), 0, hooks=[hook])
        values.append(hook.value)
    assert values[1] == pytest.approx(values[0] * 0.25)


def test_hook_error_is_one_clear_line(tmp_path):
    class Explode(TrainingHook):
        name = "explode"

        def after_step(self, step):
            if step.index == 1:
                raise RuntimeError("teacher weights diverged")

    data = _dataset(tmp_path, "l", 2)
    with pytest.raises(TrainingHookError) as info:
        train(
            ToyDetector(), [BatchSource("l", data)], TrainSchedule(iterations=4), 0, [], [Explode()]
        )
    message = str(info.value)
    assert "\n" not in message and isinstance(info.value, AlrunError)
    assert (
        "hook 'explode' failed at iteration 2 of 4: RuntimeError: teacher weights diverged"
        in message
    )


def test_bad_sources_are_clear_errors(tmp_path):
    data, empty = _dataset(tmp_path, "l", 2), DetectionDataset("e", ("a", "b"), ())
    schedule = TrainSchedule(iterations=1)
    with pytest.raises(AlrunError, match="no labelled images"):
        train(ToyDetector(), [BatchSource("l", empty)], schedule, 0)
    with pytest.raises(AlrunError, match="source 'u' has no images"):
        train(ToyDetector(), [BatchSource("l", data), BatchSource("u", empty)], schedule, 0)
    with pytest.raises(AlrunError, match="role must be one of"):
        BatchSource("x", data, role="weak")
    with pytest.raises(AlrunError, match="no loss this iteration"):
        train(ToyDetector(), [BatchSource("u", data, "unlabelled")], schedule, 0)


def test_unlabelled_first_source_with_a_hook_loss_trains(tmp_path):
    class Consistency(TrainingHook):
        def extra_losses(self, step):
            images = torch.stack(step.batches["u"].images)
            flipped = images.flip(-1)
            weight = step.detector.weight
            return {"c": ((images.mean((2, 3)) - flipped.mean((2, 3))) * weight).pow(2).sum()}

    stats = train(
        ToyDetector(),
        [BatchSource("u", _dataset(tmp_path, "u", 2), "unlabelled")],
        TrainSchedule(iterations=2),
        0,
        hooks=[Consistency()],
    )
    assert math.isfinite(stats["final_loss"]) and stats["iterations"] == 2


def test_torchvision_backend_features_feed_a_hook_loss(tmp_path):
    """A domain-alignment-style hook: a loss on backbone features of unlabelled target images."""
    from functools import partial

    from alrun.detectors.base import FeatureDetector
    from alrun.detectors.tiny import tiny_fcos
    from alrun.detectors.torchvision import TorchvisionDetector

    class FeatureNorm(TrainingHook):
        name = "align"

        def extra_losses(self, step):
            feats = step.detector.features(step.batches["target"].images)
            self.levels = sorted(feats)
            return {"feat": sum(f.pow(2).mean() for f in feats.values())}

    weights = []
    for hooks in ([], [FeatureNorm()]):
        det = TorchvisionDetector(partial(tiny_fcos, image_size=32), num_classes=2, device="cpu")
        assert isinstance(det, FeatureDetector)
        sources = [
            BatchSource("labelled", _dataset(tmp_path, "l", 2)),
            BatchSource("target", _dataset(tmp_path, "t", 2), "unlabelled"),
        ]
        stats = train(det, sources, TrainSchedule(iterations=2, batch_size=2), 0, hooks=hooks)
        weights.append(det.state_dict()["backbone.blocks.0.0.weight"])
    assert hooks[0].levels == ["p3", "p4", "p5"] and math.isfinite(stats["final_loss"])
    assert not torch.equal(weights[0], weights[1])  # the hook's loss reached the backbone


def test_torchvision_backend_shifts_labels_for_background_heads():
    from functools import partial

    from alrun.detectors.tiny import tiny_fcos
    from alrun.detectors.torchvision import TorchvisionDetector

    det = TorchvisionDetector(partial(tiny_fcos, image_size=32), 2, device="cpu", label_offset=1)
    seen = []
    det.model = lambda images, targets: seen.append(targets) or {"x": torch.zeros(())}
    targets = [{"boxes": torch.zeros((1, 4)), "labels": torch.tensor([0])}]
    det.losses([torch.zeros(3, 8, 8)], targets)
    assert seen[0][0]["labels"].tolist() == [1] and targets[0]["labels"].tolist() == [0]


def test_hook_parameters_are_optimised_with_the_detector(tmp_path):
    """A hook's own head (built in before_training) trains: w <- w - lr * 2 (w - 3) = 1.4."""

    class Head(TrainingHook):
        def before_training(self, detector, total):
            self.w = torch.nn.Parameter(torch.ones(1))

        def parameters(self):
            return [self.w]

        def extra_losses(self, step):
            return {"head": (self.w - 3).pow(2).sum()}

    hook = Head()
    schedule = TrainSchedule(iterations=1, lr=0.1, **PLAIN)
    train(ToyDetector(), [BatchSource("l", _dataset(tmp_path, "l", 2))], schedule, 0, hooks=[hook])
    torch.testing.assert_close(hook.w.detach(), torch.tensor([1.4]))


def test_accumulate_splits_each_step_into_micro_batches(tmp_path):
    """trainer.accumulate=2: each step's batch of 4 is two forwards of 2 (batch[0::2],
    batch[1::2]) and one optimiser step; the toy loss is a mean over images, so the averaged
    micro-batch gradients are the whole batch's."""
    data = _dataset(tmp_path, "l", 8)

    def run(accumulate):
        detector = ToyDetector()
        schedule = TrainSchedule(iterations=3, lr=0.1, batch_size=4, accumulate=accumulate, **PLAIN)
        stats = train(detector, [BatchSource("l", data)], schedule, 0)
        return detector, stats

    whole, whole_stats = run(1)
    split, split_stats = run(2)
    assert [len(t) for t in whole.targets_seen] == [4, 4, 4]
    assert [len(t) for t in split.targets_seen] == [2] * 6
    assert torch.allclose(split.weight, whole.weight, atol=1e-6)
    assert split_stats["iterations"] == 3.0
    assert split_stats["final_loss"] != pytest.approx(0.0)


class NoisyToy(ToyDetector):
    """Draws ``count`` random numbers every forward, as Faster R-CNN's box samplers or dropout."""

    def __init__(self, count: int):
        super().__init__()
        self.count, self.drawn = count, []

    def losses(self, images, targets):
        self.drawn.append(torch.rand(self.count))
        return super().losses(images, targets)


def test_each_micro_batch_draws_from_a_seed_of_its_own(tmp_path):
    """accumulate=2: micro-batch m of step i draws from (seed, i, m), not from what micro-batch
    m - 1 left in the stream (rank m of 2 computes it alone, so 2 ranks draw what one process
    draws); the global stream after training does not depend on the micro-batches' draws.
    accumulate=1 draws from the global stream, as before."""
    data = _dataset(tmp_path, "l", 8)

    def first_draws(count: int, accumulate: int) -> tuple[list[float], torch.Tensor]:
        detector = NoisyToy(count)
        schedule = TrainSchedule(iterations=2, lr=0.1, batch_size=4, accumulate=accumulate, **PLAIN)
        train(detector, [BatchSource("l", data)], schedule, 0)
        return [float(d[0]) for d in detector.drawn], torch.rand(2)

    (few, after_few), (many, after_many) = first_draws(1, 2), first_draws(5, 2)
    assert few == many and len(set(few)) == 4
    assert torch.equal(after_few, after_many)
    (few, _), (many, _) = first_draws(1, 1), first_draws(5, 1)
    assert few[0] == many[0] and few[1] != many[1]
