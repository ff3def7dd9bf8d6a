"""The MMDetection backend: lazy import and install hint without mmdet; with mmdet (tests
marked ``mmdet``, run by ``.venv-mmdet/bin/python -m pytest -m mmdet``), real mmdet models
trained by alrun's engine, post-processing that keeps probabilities and features and matches
mmdet's own, checkpoints, and one tiny round of the loop on CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch

from alrun.detectors.base import Detector, TrainSchedule
from alrun.errors import AlrunError
from alrun.types import Needs
from tests.detectors.mmdet_helpers import (
    ENV,
    SMALL,
    csd_training_step,
    faster_rcnn,
    needs_mmdet,
    one_cli_round,
    retinanet,
    short_training,
    without_mmdet,
)
from tests.helpers import REPO, compose_config


# --- without mmdet (every CI run) -----------------------------------------------------------
def test_module_imports_without_mmdet():
    """Importing the adapter (Hydra does, to build a partial) must not import mmdet."""
    code = (
        "import sys, alrun.detectors.mmdet; "
        "print(sorted(m for m in sys.modules if m.startswith(('mmdet', 'mmcv', 'mmengine'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=ENV, cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


@pytest.mark.integration
@without_mmdet
def test_without_mmdet_the_cli_says_how_to_install_it(tmp_path):
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "alrun.cli", "experiment=smoke", "detector=mmdet_retinanet_r50",
         "quiet=true", f"hydra.run.dir={run_dir}"],
        env=ENV, cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2 and "Traceback" not in result.stderr, result.stderr
    assert lines[1] == "  see docs/clusters.md"
    assert lines[0].startswith("alrun: error: detector: the MMDetection backend needs mmdet")
    assert "bash scripts/install_mmdet.sh" in lines[0] and ".venv-mmdet" in lines[0]
    assert not list(run_dir.glob("round_*")) and not (run_dir / "state.json").exists()


def test_missing_config_file_is_one_line(tmp_path):
    from alrun.detectors.mmdet import resolve_config_path

    with pytest.raises(AlrunError) as err:
        resolve_config_path(str(tmp_path / "nope.py"))
    message = str(err.value)
    assert message.startswith("detector.builder.config: mmdet config")
    assert "nope.py" in message and "does not exist" in message and "\n" not in message


# --- with mmdet ---------------------------------------------------------------------------
@needs_mmdet
@pytest.mark.mmdet
@pytest.mark.parametrize("build", [retinanet, faster_rcnn], ids=["retinanet", "faster_rcnn"])
def test_engine_trains_an_mmdet_model(build, data):
    det = build()
    assert isinstance(det, Detector)
    before = {k: v.clone() for k, v in det.state_dict().items()}
    stats = short_training(det, data)
    assert stats["iterations"] == 2 and torch.isfinite(torch.tensor(stats["final_loss"]))
    changed = [k for k, v in det.state_dict().items() if not torch.equal(v, before[k])]
    assert any("head" in k for k in changed), "the heads were not trained"


@needs_mmdet
@pytest.mark.mmdet
def test_building_a_model_does_not_print_every_parameters_init(capfd):
    """mmengine writes each parameter's init at INFO when no log file is attached; alrun builds
    with its logger at WARNING, and puts the level back after."""
    from mmengine.logging import MMLogger

    level = MMLogger.get_current_instance().level
    det = retinanet()
    out, err = capfd.readouterr()
    assert "Init" not in out + err and "bbox_head.retina_cls" not in out + err
    assert MMLogger.get_current_instance().level == level
    assert det.model.bbox_head.retina_cls.bias.mean().item() < -4  # the prior init still ran


@needs_mmdet
@pytest.mark.mmdet
def test_retinanet_keeps_probs_and_feats_and_matches_mmdet_predict(data):
    det = retinanet()
    preds = det.predict(data.images, Needs(probs=True, feats=True, embedding=True))
    assert det.head_type == "sigmoid"
    for record, p in zip(data.images, preds):
        n = len(p)
        assert n > 0
        assert p.probs.shape == (n, 4) and p.class_probs.shape == (n, 3)
        assert p.feats.shape == (n, 256) and p.embedding.shape == (5 * 256,)
        torch.testing.assert_close(p.probs.sum(1), torch.ones(n))
        torch.testing.assert_close(p.scores, p.class_probs[torch.arange(n), p.labels])
        assert (
            float(p.boxes[:, 2].max()) <= record.width
            and float(p.boxes[:, 3].max()) <= record.height
        )
    # mmdet's own predict (its NMS, rescaled to the original image) keeps the same boxes
    from alrun.data.images import load_image

    det.model.eval()
    inputs, samples = det._prepare([load_image(r) for r in data.images[:2]])
    with torch.no_grad():
        theirs = det.model.predict(inputs, samples, rescale=True)
    for ours, ref in zip(preds[:2], theirs):
        ref = ref.pred_instances
        k = min(20, len(ref.scores), len(ours))
        torch.testing.assert_close(ours.scores[:k], ref.scores[:k], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(ours.boxes[:k], ref.bboxes[:k], atol=1e-3, rtol=1e-4)
        assert torch.equal(ours.labels[:k], ref.labels[:k])


@needs_mmdet
@pytest.mark.mmdet
def test_faster_rcnn_keeps_softmax_box_features_and_proposals(data):
    det = faster_rcnn()
    preds = det.predict(data.images[:3], Needs(probs=True, feats=True))
    assert det.head_type == "softmax"
    total = 0
    for p in preds:
        n = len(p)
        total += n
        assert (
            p.probs.shape == (n, 4) and p.feats.shape == (n, 1024) and p.proposals.shape == (n, 4)
        )
        torch.testing.assert_close(p.probs.sum(1), torch.ones(n))
        torch.testing.assert_close(p.scores, p.probs[torch.arange(n), p.labels])
        assert int(p.labels.max()) < 3  # background (last column) is never a label
    assert total > 0


@needs_mmdet
@pytest.mark.mmdet
def test_checkpoints_round_trip_and_refuse_another_class_count(data, tmp_path):
    det = retinanet()
    short_training(det, data, iterations=1)
    file = tmp_path / "mmdet_style.pth"
    torch.save(
        {"meta": {"epoch": 1, "note": object.__name__}, "state_dict": det.state_dict()}, file
    )
    from alrun.detectors.mmdet import MMDetDetector, mmdet_model

    builder = partial(
        mmdet_model,
        config="mmdet::_base_/models/retinanet_r50_fpn.py",
        cfg_options={"model.test_cfg.score_thr": 0.0},
        **SMALL,
    )
    again = MMDetDetector(builder, num_classes=3, device="cpu", pretrained=str(file))
    a = det.predict(data.images[:1], Needs())[0]
    b = again.predict(data.images[:1], Needs())[0]
    torch.testing.assert_close(a.boxes, b.boxes)
    with pytest.raises(AlrunError) as err:
        MMDetDetector(builder, num_classes=5, device="cpu", pretrained=str(file))
    message = str(err.value)
    assert message.startswith("detector.pretrained:") and "another number of classes" in message
    assert "this dataset has 5" in message and "\n" not in message


@needs_mmdet
@pytest.mark.mmdet
def test_missing_mmdet_config_and_local_backbone(tmp_path):
    from alrun.detectors.mmdet import load_backbone, mmdet_model

    with pytest.raises(AlrunError, match="mmdet config 'mmdet::nope/none.py' does not exist"):
        mmdet_model(3, "mmdet::nope/none.py")
    import torchvision

    file = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), file)
    built = mmdet_model(
        3,
        "mmdet::_base_/models/retinanet_r50_fpn.py",
        cfg_options={"model.backbone.depth": 18, "model.neck.in_channels": [64, 128, 256, 512]},
        from_scratch=False,
    )
    load_backbone(built.model, str(file))
    expected = torch.load(file, weights_only=True)["layer1.0.conv1.weight"]
    torch.testing.assert_close(built.model.backbone.layer1[0].conv1.weight, expected)
    with pytest.raises(AlrunError, match="does not fit this backbone"):
        torch.save(torchvision.models.resnet34().state_dict(), file)
        load_backbone(built.model, str(file))


@needs_mmdet
@pytest.mark.mmdet
@pytest.mark.parametrize("detector", ["mmdet_retinanet_r50", "mmdet_faster_rcnn_r50"])
def test_one_tiny_round_of_the_loop(detector, tmp_path):
    """The real CLI, a real mmdet model, one acquisition round on CPU at 96 px (smoke's
    detector.builder.image_size)."""
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "alrun.cli", "experiment=smoke", f"detector={detector}",
         "detector.builder.min_size=96", "detector.builder.max_size=128",
         "dataset.max_pool_images=10", "dataset.max_test_images=4", "budget.initial=4",
         "budget.per_round=2", "budget.rounds=1", "trainer.batch_size=2",
         "trainer.first_iterations=2", "trainer.iterations=1", "trainer.warmup_iters=1",
         "trainer.lr=0.001", "quiet=true", f"hydra.run.dir={run_dir}",
         f"+detector.builder.cfg_options.{_score_key(detector)}=0.0"],
        env={**ENV, "ALRUN_CACHE": str(tmp_path / "cache")}, cwd=REPO, capture_output=True,
        text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rows = (run_dir / "results.csv").read_text().splitlines()
    assert len(rows) == 3  # header, round 0, round 1
    selection = (run_dir / "round_00" / "selection.json").read_text()
    assert '"entropy"' in selection
    assert (run_dir / "round_01" / "checkpoint.pt").is_file()


def _score_key(detector: str) -> str:
    return (
        "model.test_cfg.score_thr" if "retinanet" in detector else "model.test_cfg.rcnn.score_thr"
    )


def test_config_files_name_the_mmdet_models():
    for name, config in (
        ("mmdet_retinanet_r50", "retinanet_r50_fpn.py"),
        ("mmdet_faster_rcnn_r50", "faster-rcnn_r50_fpn.py"),
    ):
        cfg = compose_config([f"detector={name}"])
        assert cfg.detector.builder.config.endswith(config)
        assert Path(REPO / "alrun" / "configs" / "detector" / f"{name}.yaml").is_file()


def test_capabilities_are_declared_from_the_config_without_mmdet():
    from alrun.detectors.capabilities import detector_config_capabilities

    dense = detector_config_capabilities(compose_config(["detector=mmdet_retinanet_r50"]).detector)
    two_stage = detector_config_capabilities(
        compose_config(["detector=mmdet_faster_rcnn_r50"]).detector
    )
    assert {"box_features", "embeddings", "image_views"} <= dense
    assert {"mc_dropout", "teacher", "flip_views"} <= dense
    assert two_stage - dense == {"proposals"}
    assert dense - two_stage == {"anchor_quality", "head_features", "mixture_head", "dense_head"}
    assert {"rebuild", "flip_views", "dense_head"} <= dense


@needs_mmdet
@pytest.mark.mmdet
def test_built_models_declare_what_their_configs_say_and_refuse_the_rest(data):
    det = retinanet()
    assert det.capabilities == detector_config_capabilities_of("mmdet_retinanet_r50")
    assert faster_rcnn().capabilities == detector_config_capabilities_of("mmdet_faster_rcnn_r50")
    with pytest.raises(AlrunError, match="the head has no mixture head"):
        det.predict(data.images[:1], Needs(mixture_density=4))
    with pytest.raises(AlrunError, match="gradient outputs are not implemented"):
        det.predict(data.images[:1], Needs(grads=True))
    with pytest.raises(AlrunError, match="the heads have no dropout"):
        det.predict(data.images[:1], Needs(passes=10, head_dropout=0.2))


def detector_config_capabilities_of(name: str):
    from alrun.detectors.capabilities import detector_config_capabilities

    return detector_config_capabilities(compose_config([f"detector={name}"]).detector)


@needs_mmdet
@pytest.mark.mmdet
def test_backend_independent_ensemble_and_views_on_mmdet(data):
    """Ensembles (fresh members, trained by the engine) and test-time views need nothing of
    the mmdet backend beyond its protocol and predict_images."""
    from alrun.detectors.passes import Ensemble, Predictor
    from alrun.engine import BatchSource, StrategyTraining, train_round

    det = retinanet()
    ensemble = Ensemble(retinanet, 2)
    schedule = TrainSchedule(iterations=1, batch_size=2, warmup_iters=1, lr=0.001)
    training = StrategyTraining(ensemble=ensemble)
    stats = train_round(det, [BatchSource("labelled", data)], schedule, 0, 0, strategy=training)
    assert "member1/final_loss" in stats
    preds = Predictor(det, ensemble).predict(
        data.images[:2], Needs(probs=True, passes=2, ensemble=2)
    )
    assert all(len(p.passes) == 2 for p in preds)
    viewed = det.predict(data.images[:2], Needs(probs=True, augment=("hflip",)))
    assert all(len(p.passes) == 1 for p in viewed)


# --- MC dropout, teachers, flipped views ----------------------------------------------------
@needs_mmdet
@pytest.mark.mmdet
@pytest.mark.parametrize("build", [retinanet, faster_rcnn], ids=["retinanet", "faster_rcnn"])
def test_mc_dropout_passes_row_for_row_and_trained_with(build, data):
    """T passes in Detections.passes, row i of each pass = row i of the plain pass (same
    anchor / proposal, same label), stochastic; the same images give the same passes; the
    model trains with the dropout and the plain pass stays deterministic."""
    det = build()
    det.enable_mc_dropout(0.3)
    short_training(det, data, iterations=1)
    needs = Needs(probs=True, passes=4, head_dropout=0.3)
    preds = det.predict(data.images[:3], needs)
    plain = det.predict(data.images[:3], Needs(probs=True))
    spread = 0.0
    for p, q in zip(preds, plain):
        torch.testing.assert_close(p.scores, q.scores)  # the reference pass has no dropout
        assert len(p.passes) == 4
        for mc in p.passes:
            assert len(mc) == len(p) and torch.equal(mc.labels, p.labels)
            assert torch.equal(mc.sources, p.sources)
            assert mc.probs.shape == p.probs.shape
            torch.testing.assert_close(mc.probs.sum(1), torch.ones(len(mc)))
            torch.testing.assert_close(mc.scores, mc.class_probs[torch.arange(len(mc)), mc.labels])
            spread = max(spread, float((mc.probs - p.probs).abs().max()))
    assert spread > 1e-6, "the passes do not differ from the plain pass"  # a young head
    again = det.predict(data.images[:3], needs)
    torch.testing.assert_close(again[0].passes[1].probs, preds[0].passes[1].probs)


@needs_mmdet
@pytest.mark.mmdet
def test_retinanet_mc_pass_at_anchors_is_the_full_pass_with_the_same_masks(data):
    """The cheap pass (last convs at the reference anchors only) equals retina_cls/retina_reg
    run over the whole masked tower maps, read at the same anchors."""
    from alrun.data.images import load_image
    from alrun.detectors import mmdet as backend
    from alrun.detectors import mmdet_mc
    from alrun.detectors.torchvision.mc_dropout import channel_mask

    det = retinanet()
    det.enable_mc_dropout(0.4)
    det.model.eval()
    head = det.model.bbox_head
    with torch.no_grad():
        inputs, samples = det._prepare([load_image(r) for r in data.images[:2]])
        levels = list(det.model.extract_feat(inputs))
        towers = mmdet_mc.retina_towers(head, levels)
        found = backend._dense(head, levels, samples, mmdet_mc.retina_last(head, towers))
        torch.manual_seed(3)
        (cheap,) = mmdet_mc.dense_mc_passes(head, levels, towers, found, samples, 1)
        torch.manual_seed(3)
        cls_mask = channel_mask(2, 256, 0.4, "cpu")
        reg_mask = channel_mask(2, 256, 0.4, "cpu")
        logits = torch.cat(
            [mmdet_mc.anchor_rows(head.retina_cls(c * cls_mask[:, :, None, None]), 3)
             for c, _ in towers], dim=1,
        )  # fmt: skip
        deltas = torch.cat(
            [mmdet_mc.anchor_rows(head.retina_reg(r * reg_mask[:, :, None, None]), 4)
             for _, r in towers], dim=1,
        )  # fmt: skip
        sizes = [f.shape[-2:] for f in levels]
        priors = torch.cat(head.prior_generator.grid_priors(sizes, device="cpu"))
    for b, (ref, mc) in enumerate(zip(found, cheap)):
        assert len(ref["sources"]) > 0
        full = logits[b][ref["sources"]]
        torch.testing.assert_close(mc["class_probs"], full.sigmoid(), atol=1e-5, rtol=1e-4)
        h, w = samples[b].metainfo["img_shape"]
        boxes = head.bbox_coder.decode(
            priors[ref["sources"]], deltas[b][ref["sources"]], max_shape=(h, w)
        )
        torch.testing.assert_close(mc["boxes"], boxes, atol=1e-3, rtol=1e-4)


@needs_mmdet
@pytest.mark.mmdet
@pytest.mark.parametrize("build", [retinanet, faster_rcnn], ids=["retinanet", "faster_rcnn"])
def test_teacher_module_is_a_torchvision_style_teacher(build, data):
    """teacher_module(): torchvision's forward (original-pixel boxes, dataset labels), the
    detector's own predictions; its deep copy is a frozen teacher that EMA updates move."""
    from alrun.data.images import load_image
    from alrun.supervision.pseudo_label import ema_update, frozen_copy, teacher_targets

    det = build()
    images = [load_image(r) for r in data.images[:2]]
    teacher = frozen_copy(det.teacher_module())
    found = teacher_targets(teacher, images, 0.0)
    plain = det.predict(data.images[:2], Needs())
    for t, p in zip(found, plain):
        keep = (p.boxes[:, 2] > p.boxes[:, 0]) & (p.boxes[:, 3] > p.boxes[:, 1])
        torch.testing.assert_close(t["boxes"], p.boxes[keep], atol=1e-4, rtol=1e-4)
        assert torch.equal(t["labels"], p.labels[keep])
    short_training(det, data, iterations=1)
    key = next(k for k, v in teacher.state_dict().items() if v.dtype.is_floating_point)
    before = teacher.state_dict()[key].clone()
    student = det.teacher_module().state_dict()[key]
    assert not torch.equal(before, student)
    ema_update(teacher, det.teacher_module(), 0.5)
    torch.testing.assert_close(teacher.state_dict()[key], 0.5 * before + 0.5 * student)
    assert not any(p.requires_grad for p in teacher.parameters())


@needs_mmdet
@pytest.mark.mmdet
def test_flipped_views_for_csd(data):
    """flip_view_outputs: one pass over the batch and its mirror image; the mirrored half is
    exactly the plain outputs of the mirrored image, and CSD's hook trains through it."""
    from alrun.data.images import load_image

    det = retinanet()
    det.model.eval()  # BatchNorm statistics of the batch would couple the two halves
    image = torch.nn.functional.interpolate(load_image(data.images[0])[None], size=(96, 128))[0]
    with torch.no_grad():
        views = det.flip_view_outputs([image])
        mirrored = det.flip_view_outputs([image.flip(-1)])
    assert views.cls.shape[0] == 2 and views.encoding == "delta" and views.per_location == 9
    assert views.cls.shape[1] == sum(h * w for h, w in views.shapes) * 9
    torch.testing.assert_close(views.cls[1], mirrored.cls[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(views.box[1], mirrored.box[0], atol=1e-4, rtol=1e-4)
    csd_training_step(det, data.images[:2])
    grad = det.model.bbox_head.retina_cls.weight.grad
    assert grad is not None and float(grad.abs().sum()) > 0


@needs_mmdet
@pytest.mark.mmdet
@pytest.mark.parametrize(
    "overrides",
    [["strategy=mc_entropy", "strategy.scorer.passes=3", "supervision=pseudo_label",
      "supervision.threshold=0.0"], ["supervision=consistency"]],
    ids=["mc_entropy+pseudo_label", "consistency"],
)  # fmt: skip
def test_one_round_with_the_new_capabilities(overrides, tmp_path):
    """The real CLI on detector=mmdet_retinanet_r50 (ResNet-18 at 96 px, to fit CI's mmdet
    step), one round of each strategy and regime that needs MC dropout, a teacher or flipped
    views."""
    run_dir, result = one_cli_round(tmp_path, "mmdet_retinanet_r50", *overrides)
    train = json.loads((run_dir / "round_01" / "metrics.json").read_text())["train"]
    assert "resnet18" not in result.stderr  # nothing downloaded
    if "supervision=pseudo_label" in overrides:
        assert train["pseudo/has_teacher"] == 1.0 and train["pseudo/images"] > 0
    if "supervision=consistency" in overrides:
        assert train["consistency/images"] > 0
    if "strategy=mc_entropy" in overrides:
        selection = json.loads((run_dir / "round_00" / "selection.json").read_text())
        assert len(selection["selected"]) == 2, selection.keys()
