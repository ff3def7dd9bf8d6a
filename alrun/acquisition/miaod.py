"""MI-AOD (Yuan et al., "Multiple Instance Active Learning for Object Detection", CVPR 2021).

Reference: github.com/yuantn/MI-AOD, ``mmdet/models/dense_heads/MIAOD_retina_head.py``
(``MIAODRetinaHead``: the two instance classifiers ``f_1``/``f_2`` and the MIL classifier
``f_mil``, each a tower of ``stacked_convs`` 3x3 convs and a 3x3 output conv of A x C channels,
shared by the FPN levels), ``MIAOD_head.py`` (``L_det``: focal loss of each classifier averaged,
``l_imgcls``: BCE of the MIL image score; ``l_wave_dis`` / ``l_wave_dis_minus``: the
MIL-weighted discrepancy minimised / maximised on unlabelled images), ``mmdet/apis/test.py``
``calculate_uncertainty`` (the image score), ``configs/MIAOD.py`` (k = 10000, lambda = 0.5).

* **Instance uncertainty** of instance i (a location x anchor of a level):
  ``mean_c (sigmoid f_1 - sigmoid f_2)^2``; the **image uncertainty** is the mean of the ``k``
  largest instance uncertainties over all levels (``calculate_uncertainty``).
* **MIL re-weighting** (``forward_single``): ``w = softmax_c(f_mil) *
  softmax_instances(max_c sigmoid((f_1 + f_2) / 2))`` per level; the image's class score is the
  max over levels of the sum over instances (``get_img_gtlabel_score``), trained by BCE against
  the classes present. The reference weights the discrepancy *losses* by ``w``; its selection
  (``calculate_uncertainty``) does not, so ``reweight: none`` is the default and ``reweight:
  mil`` (each instance's discrepancy times its largest class weight, summed) is alrun's option
  for the paper's wording.

The heads sit beside the detector's own dense head and read its FPN levels (alrun keeps the
detector's classifier and box regressor; the reference replaces the classifier by ``f_1``/``f_2``
and regresses with ``f_r``). Instances are the detector's anchors (RetinaNet A = 9, FCOS 1),
labelled by RetinaNet's IoU matching (0.5 / 0.4, low-quality matches kept; the reference's
``MaxIoUAssigner``) on the detector's own anchor boxes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Annotated, Any, Literal

import torch
from torch import Tensor, nn
from torchvision.models.detection import _utils as det_utils
from torchvision.ops import box_iou, sigmoid_focal_loss

import alrun.distributed as distributed
from alrun.acquisition.context import AcquisitionContext
from alrun.acquisition.learned import _level_widths
from alrun.detectors.base import DENSE_HEAD, FEATURE_MAPS, FPN_FEATURES, TEACHER, DenseBatch
from alrun.engine import STRATEGY_UNLABELLED, Step, TrainingHook
from alrun.errors import AlrunError
from alrun.params import PositiveFloat, PositiveInt, Range
from alrun.types import Needs

#: what the heads read: one-width FPN levels with gradients, the torch module's anchor generator
#: and transform, and a dense head to sit beside (the detectors that host AL-MDN's mixture head
#: beside their dense head; two-stage models do not)
MIAOD_REQUIRES = (FEATURE_MAPS, FPN_FEATURES, TEACHER, DENSE_HEAD)
REWEIGHTS = ("none", "mil")


class InstanceClassifiers(nn.Module):
    """MI-AOD's ``f_1``, ``f_2`` and ``f_mil`` (``MIAODRetinaHead``) on FPN levels of
    ``channels`` width: per level, (B, H*W*A, C) logits of each, location-major, anchor-minor
    (torchvision's anchor order)."""

    def __init__(self, channels: int, anchors: int, num_classes: int, stacked_convs: int = 4):
        super().__init__()
        self.anchors, self.num_classes = int(anchors), int(num_classes)

        def tower() -> nn.Sequential:
            layers: list[nn.Module] = []
            for _ in range(stacked_convs):
                layers += [nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(inplace=True)]
            return nn.Sequential(*layers)

        self.f_1_convs, self.f_2_convs, self.f_mil_convs = tower(), tower(), tower()
        out = self.anchors * self.num_classes
        self.f_1 = nn.Conv2d(channels, out, 3, padding=1)
        self.f_2 = nn.Conv2d(channels, out, 3, padding=1)
        self.f_mil = nn.Conv2d(channels, out, 3, padding=1)
        prior = -math.log((1 - 0.01) / 0.01)  # mmcv bias_init_with_prob(0.01)
        for module in (*self.f_1_convs, *self.f_2_convs, self.f_1, self.f_2, self.f_mil):
            if isinstance(module, nn.Conv2d):  # normal_init(std=0.01); f_mil's tower: mmcv's
                nn.init.normal_(module.weight, std=0.01)  # ConvModule (kaiming) init
                nn.init.constant_(module.bias, prior if module.out_channels == out else 0.0)
        for module in self.f_mil_convs:
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(module.bias)

    def _flat(self, x: Tensor) -> Tensor:
        b, _, h, w = x.shape
        x = x.view(b, self.anchors, self.num_classes, h, w).permute(0, 3, 4, 1, 2)
        return x.reshape(b, -1, self.num_classes)

    def frozen_classifiers(self, levels: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """``f_1``, ``f_2`` with their weights detached: the gradient reaches only the input
        (MI-AOD's min step sets ``requires_grad=False`` on ``theta_f_1``, ``theta_f_2``)."""
        frozen = {name: p.detach() for name, p in self.named_parameters()}
        f1, f2 = [], []
        for x in levels:
            a, b, _ = torch.func.functional_call(self, frozen, ([x],))
            f1.append(a[0])
            f2.append(b[0])
        return f1, f2

    def mil(self, levels: Sequence[Tensor]) -> list[Tensor]:
        return [self._flat(self.f_mil(self.f_mil_convs(x))) for x in levels]

    def forward(self, levels: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        f1, f2, mil = [], [], []
        for x in levels:
            f1.append(self._flat(self.f_1(self.f_1_convs(x))))
            f2.append(self._flat(self.f_2(self.f_2_convs(x))))
            mil.append(self._flat(self.f_mil(self.f_mil_convs(x))))
        return f1, f2, mil


def mil_weights(f1: Tensor, f2: Tensor, f_mil: Tensor) -> Tensor:
    """MI-AOD's ``y_head_cls`` of one level, (B, N, C): ``softmax_c(f_mil) x
    softmax_N(max_c sigmoid((f_1 + f_2) / 2))``, the classifiers' term detached."""
    term2 = ((f1 + f2) / 2).detach()
    return f_mil.softmax(2) * term2.sigmoid().max(2, keepdim=True)[0].softmax(1)


def image_class_scores(weights: Sequence[Tensor]) -> Tensor:
    """The MIL image class score (B, C): the max over levels of the sum over instances,
    clamped to [1e-5, 1 - 1e-5] (``get_img_gtlabel_score``)."""
    score = torch.zeros_like(weights[0][:, 0])
    for w in weights:
        score = torch.maximum(score, w.sum(1))
    return score.clamp(1e-5, 1.0 - 1e-5)


def discrepancy_loss(
    f1: Tensor, f2: Tensor, weights: Tensor, param_lambda: float = 0.5, maximise: bool = False
) -> Tensor:
    """``l_wave_dis`` (min) / ``l_wave_dis_minus`` (max) of one level: ``lambda x sum over
    instances of mean_c(|sigmoid f_1 - sigmoid f_2| x w)``, ``1 - |...|`` when maximising."""
    gap = (f1.sigmoid() - f2.sigmoid()).abs()
    if maximise:
        gap = 1 - gap
    c = f1.shape[-1]
    return (gap.reshape(-1, c) * weights.reshape(-1, c)).mean(dim=1).sum() * param_lambda


def pseudo_image_labels(f1: Sequence[Tensor], f2: Sequence[Tensor]) -> Tensor:
    """``get_img_pseudolabel_score``: class c is present when the max over levels and
    instances of ``(sigmoid f_1 + sigmoid f_2) / 2`` is >= 0.5 (B, C), without gradient."""
    with torch.no_grad():
        out = torch.zeros_like(f1[0][:, 0])
        for a, b in zip(f1, f2):
            out = torch.maximum(out, (a.sigmoid() + b.sigmoid()).max(1)[0] / 2)
        return (out >= 0.5).float()


def instance_uncertainty(f1: Tensor, f2: Tensor) -> Tensor:
    """(N,) ``mean_c (sigmoid f_1 - sigmoid f_2)^2`` of one image's (N, C) logits."""
    return (f1.sigmoid() - f2.sigmoid()).pow(2).mean(dim=1)


def image_uncertainty(
    f1: Tensor, f2: Tensor, k: int = 10000, weights: Tensor | None = None
) -> float:
    """``calculate_uncertainty``: the mean of the ``k`` largest instance uncertainties of one
    image (logits (N, C) over all levels). With ``weights`` (N, C), the MIL option: the sum of
    each instance's uncertainty times its largest class weight."""
    u = instance_uncertainty(f1.float(), f2.float())
    if weights is not None:
        return float((u * weights.float().max(dim=1).values).sum())
    return float(u.topk(min(int(k), len(u))).values.mean())


class MiaodHook(TrainingHook):
    """Trains the instance classifiers beside the detector: on its labelled batches MI-AOD's
    label-set losses (``(FL(f_1) + FL(f_2)) / 2`` + ``l_imgcls``); with ``adversarial``, on a
    batch of the unlabelled pool each iteration, the max step (the classifiers alone maximise
    their MIL-weighted discrepancy, ``L_wave_max``) and the min step (the backbone and the MIL
    head minimise it with the classifiers frozen, plus the MIL loss on pseudo image labels,
    ``L_wave_min``), both in every iteration (the reference alternates whole epochs)."""

    name = "mi_aod"
    requires = MIAOD_REQUIRES

    def __init__(
        self,
        stacked_convs: int = 4,
        weight: float = 1.0,
        adversarial: bool = True,
        param_lambda: float = 0.5,
    ):
        self.stacked_convs, self.weight = int(stacked_convs), float(weight)
        self.adversarial, self.param_lambda = bool(adversarial), float(param_lambda)
        self.draws_unlabelled = self.adversarial
        self.heads: InstanceClassifiers | None = None
        self.detector = None
        self._batches: list[DenseBatch] = []  # this step's training forwards (dense_head)
        self._stop: Callable[[], None] | None = None
        self.losses: dict[str, list[float]] = {}
        self._step = distributed.StepNotes()  # (loss name, value) of each micro-batch

    def before_training(self, detector, total: int) -> None:
        missing = [c for c in MIAOD_REQUIRES if c not in detector.capabilities]
        if missing:
            raise AlrunError(
                f"strategy=mi_aod: needs the detector's {' and '.join(missing)} (a dense "
                f"one-stage detector with FPN levels), which {type(detector).__name__} lacks"
            )
        self.detector = detector
        widths = _level_widths(detector)
        self.heads = InstanceClassifiers(
            widths[0], detector.anchors_per_location, detector.num_classes, self.stacked_convs
        ).to(detector.device)
        self.matcher = det_utils.Matcher(0.5, 0.4, allow_low_quality_matches=True)
        self.losses = {}
        self._step.clear()
        self._remove()
        self._stop = detector.watch_dense_batches(self._capture)

    def _capture(self, batch: DenseBatch) -> None:
        if self.heads is not None and self.heads.training:
            self._batches.append(batch)

    def _remove(self) -> None:
        if self._stop is not None:
            self._stop()
        self._stop = None
        self._batches = []

    def parameters(self) -> Sequence[Tensor]:
        return list(self.heads.parameters()) if self.heads is not None else []

    def extra_losses(self, step: Step) -> dict[str, Tensor]:
        captured, self._batches = self._batches, []  # this micro-batch's (trainer.accumulate)
        batch = next((b for b in step.batches.values() if b.targets is not None), None)
        if batch is None or not captured:
            return {}
        dense = captured[0]  # the detector's forward on the labelled batch
        levels, anchors, targets = dense.levels, dense.anchors, dense.targets
        f1, f2, mil = self.heads(levels)
        weights = [mil_weights(a, b, m) for a, b, m in zip(f1, f2, mil)]
        f1_all, f2_all = torch.cat(f1, 1), torch.cat(f2, 1)
        cls_loss = label_set_loss(f1_all, f2_all, anchors, targets, 0, self.matcher)
        present = torch.zeros_like(weights[0][:, 0])
        for i, t in enumerate(targets):
            present[i, t["labels"].long()] = 1.0
        imgcls = nn.functional.binary_cross_entropy(image_class_scores(weights), present)
        out = {"det_cls": cls_loss, "imgcls": imgcls}
        unlabelled = step.batches.get(STRATEGY_UNLABELLED)
        if self.adversarial and unlabelled is not None:
            out.update(self._adversarial(unlabelled.images))
        for key, value in out.items():
            self._step.note((key, float(value.detach())))
        return {key: value * self.weight for key, value in out.items()}

    def _adversarial(self, images: Sequence[Tensor]) -> dict[str, Tensor]:
        """MI-AOD's max and min steps on one unlabelled batch (see the class docstring)."""
        levels = list(self.detector.features(list(images)).values())
        # max step: the classifiers maximise the discrepancy on fixed features (f_mil frozen)
        f1, f2, mil = self.heads([x.detach() for x in levels])
        w = [mil_weights(a, b, m).detach() for a, b, m in zip(f1, f2, mil)]
        wave_max = sum(discrepancy_loss(a, b, c, self.param_lambda, maximise=True)
                       for a, b, c in zip(f1, f2, w))  # fmt: skip
        # min step: the backbone (and f_mil) minimise it through frozen copies of f_1, f_2
        f1, f2 = self.heads.frozen_classifiers(levels)
        mil = self.heads.mil(levels)
        w = [mil_weights(a, b, m) for a, b, m in zip(f1, f2, mil)]
        wave_min = sum(discrepancy_loss(a, b, c.detach(), self.param_lambda)
                       for a, b, c in zip(f1, f2, w))  # fmt: skip
        pseudo = pseudo_image_labels(f1, f2)
        bce = nn.functional.binary_cross_entropy(image_class_scores(w), pseudo)
        if bool((pseudo.sum(1) == 0).any()):  # "ignore hard images": the batch's term is 0
            bce = bce * 0
        return {"wave_max": wave_max, "wave_min": wave_min, "imgcls_unlabelled": bce}

    def after_step(self, step: Step) -> None:
        self._batches = []
        for key, value in self._step.drain():
            self.losses.setdefault(key, []).append(value)

    def after_training(self) -> dict[str, float]:
        self._remove()
        if self.heads is not None:
            self.heads.eval()
        out: dict[str, float] = {}
        for name, values in self.losses.items():
            if values:
                tenth = max(1, len(values) // 10)
                out[f"first_{name}"] = sum(values[:tenth]) / tenth
                out[f"final_{name}"] = sum(values[-tenth:]) / tenth
        if "wave_max" in self.losses:
            out["unlabelled_steps"] = float(len(self.losses["wave_max"]))
        return out

    def outputs(self, image: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """One image's (N, C) logits of ``f_1``, ``f_2`` and MIL weights, over all levels."""
        model = self.detector.model
        was_training = model.training
        model.eval()
        self.heads.eval()
        try:
            with torch.no_grad():
                levels = list(self.detector.features([image.to(self.detector.device)]).values())
                f1, f2, mil = self.heads(levels)
                weights = [mil_weights(a, b, m) for a, b, m in zip(f1, f2, mil)]
        finally:
            model.train(was_training)
        return torch.cat(f1, 1)[0], torch.cat(f2, 1)[0], torch.cat(weights, 1)[0]


def label_set_loss(
    f1: Tensor,
    f2: Tensor,
    anchors: Sequence[Tensor],
    targets: Sequence[dict[str, Tensor]],
    offset: int,
    matcher: det_utils.Matcher,
) -> Tensor:
    """``(FL(f_1) + FL(f_2)) / 2`` over a batch: sigmoid focal loss (alpha 0.25, gamma 2)
    summed over the non-ignored instances and divided by the positives (``L_det``)."""
    total = f1.new_zeros(())
    positives = 0
    for i, target in enumerate(targets):
        gt = torch.zeros_like(f1[i])
        boxes = target["boxes"]
        if len(boxes) == 0:
            valid = torch.ones(len(gt), dtype=torch.bool, device=gt.device)
        else:
            matched = matcher(box_iou(boxes, anchors[i]))
            fg = matched >= 0
            labels = (target["labels"] - offset).long()
            gt[fg, labels[matched[fg]]] = 1.0
            valid = matched != det_utils.Matcher.BETWEEN_THRESHOLDS
            positives += int(fg.sum())
        for logits in (f1[i], f2[i]):
            total = total + sigmoid_focal_loss(logits[valid], gt[valid], reduction="sum") / 2
    return total / max(1, positives)


class MiaodUncertainty:
    """Score = MI-AOD's image uncertainty from its two instance classifiers (module docstring).

    ``k``: the instances averaged (configs/MIAOD.py ``k = 10000``); ``reweight``: ``none``
    (the reference's selection) | ``mil``; ``stacked_convs`` (4) and ``weight`` (1.0, the
    classifier losses' weight in the detector's total) shape the heads' training.
    """

    needs = Needs(detections=False)

    def __init__(
        self,
        k: PositiveInt = 10000,
        reweight: Literal[REWEIGHTS] = "none",
        stacked_convs: Annotated[int, Range(0)] = 4,
        weight: PositiveFloat = 1.0,
        adversarial: bool = True,
        param_lambda: PositiveFloat = 0.5,
    ):
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise AlrunError(f"strategy.scorer.k: expected an integer >= 1, got {k!r}")
        if reweight not in REWEIGHTS:
            raise AlrunError(
                f"strategy.scorer.reweight: expected one of {'|'.join(REWEIGHTS)}, got '{reweight}'"
            )
        if not isinstance(stacked_convs, int) or stacked_convs < 0:
            raise AlrunError(
                f"strategy.scorer.stacked_convs: expected an integer >= 0, got {stacked_convs!r}"
            )
        if not float(weight) > 0:
            raise AlrunError(f"strategy.scorer.weight: expected a number > 0, got {weight}")
        if not isinstance(adversarial, bool):
            raise AlrunError(
                f"strategy.scorer.adversarial: expected true or false, got {adversarial!r}"
            )
        if not float(param_lambda) > 0:
            raise AlrunError(
                f"strategy.scorer.param_lambda: expected a number > 0, got {param_lambda}"
            )
        self.k, self.reweight = int(k), reweight
        self.hook = MiaodHook(stacked_convs, float(weight), adversarial, float(param_lambda))

    @property
    def training_hooks(self) -> tuple[TrainingHook, ...]:
        return (self.hook,)

    def __call__(self, context: AcquisitionContext) -> dict[str, float]:
        if self.hook.heads is None:
            raise AlrunError(
                "strategy.scorer: the MI-AOD classifiers have not been trained (their training "
                "hook did not run)"
            )
        if context.load_images is None:
            raise AlrunError("strategy.scorer: MI-AOD needs the pool images (context.load_images)")
        return score_images(self.score_image, context.pool_ids, context.load_images)

    def score_image(self, image: Tensor) -> float:
        f1, f2, weights = self.hook.outputs(image)
        return image_uncertainty(f1, f2, self.k, weights if self.reweight == "mil" else None)

    def describe(self) -> dict[str, Any]:
        return {
            "scorer": "mi_aod",
            "k": self.k,
            "reweight": self.reweight,
            "stacked_convs": self.hook.stacked_convs,
            "weight": self.hook.weight,
            "adversarial": self.hook.adversarial,
            "param_lambda": self.hook.param_lambda,
        }


def score_images(
    score: Callable[[Tensor], float],
    ids: Sequence[str],
    load: Callable[[Sequence[str]], list[Tensor]],
    chunk: int = 16,
) -> dict[str, float]:
    """``score`` of every image in ``ids``, loaded ``chunk`` at a time."""
    out: dict[str, float] = {}
    ordered = list(ids)
    for start in range(0, len(ordered), chunk):
        part = ordered[start : start + chunk]
        for image_id, image in zip(part, load(part)):
            out[image_id] = score(image)
    return out
