"""``rebuild`` on the mmdet backend: the same model built fresh for another class list, and
synthetic pre-training through it (cache keyed by the mmdet config, every tensor but the class
layers transferred), and one real ``supervision=synthetic_pretrain`` round.
Marked ``mmdet`` (run with ``.venv-mmdet/bin/python -m pytest -m mmdet``)."""

from __future__ import annotations

import json

import pytest
import torch

from alrun.data.synthetic import CLASSES, synthetic_dataset
from alrun.detectors import base
from alrun.detectors.base import TrainSchedule
from alrun.pool import LabelPool
from alrun.supervision import synthetic
from alrun.supervision.synthetic import SyntheticPretrain
from tests.detectors.mmdet_helpers import (
    faster_rcnn,
    needs_mmdet,
    one_cli_round,
    retinanet,
)

pytestmark = [needs_mmdet, pytest.mark.mmdet]


@pytest.mark.parametrize("build", [retinanet, faster_rcnn], ids=["retinanet", "faster_rcnn"])
def test_rebuilt_is_the_same_model_for_other_classes(build):
    det = build(3)
    det.enable_mc_dropout(0.1)
    assert base.REBUILD in det.capabilities and isinstance(det, base.Rebuild)
    other = det.rebuilt(len(CLASSES))
    assert other.num_classes == len(CLASSES) and other.head_dropout == 0.0
    mine, theirs = det.state_dict(), other.state_dict()
    assert mine.keys() == theirs.keys()
    differ = {k for k in mine if mine[k].shape != theirs[k].shape}
    class_layers = ("retina_cls", "fc_cls", "fc_reg")  # Faster R-CNN regresses per class
    assert differ and all(k.split(".")[-2] in class_layers for k in differ), differ
    described = det.build_description()
    assert described["builder"] == "alrun.detectors.mmdet.mmdet_model"
    assert described["arguments"]["config"].startswith("mmdet::")


def test_synthetic_pretraining_of_an_mmdet_model(tmp_path, monkeypatch):
    det = retinanet(3)
    regime = SyntheticPretrain(4, 64, iterations=2, warmup_iters=1, cache_dir=tmp_path / "c")
    pool = LabelPool(synthetic_dataset(4, image_size=96, split="mmdet-rebuild"))
    no_fine_tune = lambda *a, **k: {"iterations": 0.0}  # noqa: E731
    monkeypatch.setattr(synthetic, "train_with_strategy", no_fine_tune)
    stats = regime.train(det, pool, TrainSchedule(iterations=1), 5, 0)
    path = regime.checkpoint_path(det)
    assert path.is_file() and stats["pretrain/cache_hit"] == 0.0
    pretrained = torch.load(path, weights_only=True)
    now = det.state_dict()
    same = [k for k in now if now[k].shape == pretrained[k].shape]
    assert all(torch.equal(now[k], pretrained[k]) for k in same)
    assert {k for k in now if k not in same} == {"bbox_head.retina_cls.weight",
                                                   "bbox_head.retina_cls.bias"}  # fmt: skip
    assert stats["pretrain/loaded_tensors"] == len(same)
    key = json.loads(path.with_suffix(".json").read_text())
    assert "retinanet_r50_fpn.py" in json.dumps(key)
    other = SyntheticPretrain(4, 64, iterations=2, warmup_iters=1, cache_dir=tmp_path / "c")
    assert other.checkpoint_path(faster_rcnn(3)) != path  # another mmdet config: another key


def test_one_round_of_synthetic_pretrain(tmp_path):
    run_dir, _ = one_cli_round(
        tmp_path, "mmdet_retinanet_r50", "supervision=synthetic_pretrain",
        "supervision.num_images=4", "supervision.iterations=2", "supervision.warmup_iters=1",
        "supervision.image_size=64", f"supervision.cache_dir={tmp_path / 'cache'}",
    )  # fmt: skip
    train = json.loads((run_dir / "round_00" / "metrics.json").read_text())["train"]
    # the smoke data has the synthetic classes: every tensor is transferred
    assert train["pretrain/loaded_tensors"] > 0 and train["pretrain/kept_tensors"] == 0
    assert list((tmp_path / "cache" / "pretrain").glob("*.pt"))
