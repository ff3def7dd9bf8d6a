"""Experiment presets on real data (CPU: bccd, cards, txl_pbc; paper protocols: voc_ppal,
coco_ppal, voc_miaod, voc_learning_loss) and the user's ./configs folder on the search path."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.utils import instantiate

from alrun.engine import warmup_step
from alrun.errors import AlrunError, DatasetError
from alrun.loop import build_experiment
from tests.data.fabricate import make_coco_root, make_vocdevkit
from tests.helpers import REPO, compose_config, shared_dataset

PAPER_PRESETS = ("voc_ppal", "coco_ppal", "voc_miaod", "voc_learning_loss")
CPU_PRESETS = ("bccd", "cards", "txl_pbc")
ENV_RUN = {"PYTHONPATH": str(REPO), "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1"}


def cause(err: BaseException) -> BaseException:
    """Hydra wraps what a ``_target_`` raises; the user-facing error is the cause."""
    while err.__cause__ is not None:
        err = err.__cause__
    return err


#: (preset, initial, per round, rounds, epochs, batch, lr): the numbers each yaml cites
PAPER_NUMBERS = {
    "voc_ppal": (827, 414, 6, 26, 8, 0.002),
    "coco_ppal": (2365, 2365, 4, 26, 8, 0.01),
    "voc_miaod": (827, 413, 6, 18, 2, 0.001),
    "voc_learning_loss": (1000, 1000, 10, 300, 32, 0.001),
}


@pytest.mark.parametrize("preset", PAPER_PRESETS)
def test_paper_preset_composes_with_its_protocol(preset: str):
    cfg = compose_config([f"experiment={preset}"])
    initial, per_round, rounds, epochs, batch, lr = PAPER_NUMBERS[preset]
    assert (cfg.budget.initial, cfg.budget.per_round, cfg.budget.rounds) == (
        initial,
        per_round,
        rounds,
    )
    assert (cfg.trainer.epochs, cfg.trainer.iterations, cfg.trainer.batch_size) == (
        epochs,
        0,
        batch,
    )
    assert cfg.trainer.lr == lr and cfg.trainer.init == "scratch"
    expected = {"voc_ppal": "ppal", "coco_ppal": "ppal", "voc_learning_loss": "loss_prediction"}
    assert cfg.strategy.name == expected.get(preset, "mi_aod")
    assert cfg.detector.pretrained_backbone.endswith(".pth")
    text = (REPO / "alrun" / "configs" / "experiment" / f"{preset}.yaml").read_text()
    assert text.count("[") >= 8, "every number cites its source"


#: (preset, milestone as a fraction of the round, warmup iterations, warmup ratio): PPAL's
#: retinanet_26e.py step=[20] of 26 epochs; MI-AOD's last 3-epoch label-set training drops for
#: its third epoch (16 of 18 passes); learning loss x0.1 after 240 of 300 epochs
PAPER_SCHEDULES = {
    "voc_ppal": (20 / 26, 500, 0.001),
    "coco_ppal": (20 / 26, 500, 0.001),
    "voc_miaod": (16 / 18, 0, 0.1),
    "voc_learning_loss": (240 / 300, 500, 0.001),
}


@pytest.mark.parametrize("preset", PAPER_PRESETS)
def test_paper_presets_step_the_learning_rate_as_their_papers(preset: str):
    fraction, warmup, ratio = PAPER_SCHEDULES[preset]
    schedule = instantiate(compose_config([f"experiment={preset}"]).trainer)
    assert schedule.lr_schedule == "step" and schedule.gamma == 0.1
    assert schedule.lr_steps == pytest.approx((fraction,), abs=1e-9)
    assert (schedule.warmup_iters, schedule.warmup_ratio) == (warmup, ratio)
    epoch = 50  # iterations an epoch: the drop lands on the paper's epoch boundary
    total = schedule.epochs * epoch
    lr_at = warmup_step(schedule, total)
    drop = round(fraction * schedule.epochs) * epoch
    assert lr_at(drop - 1) == pytest.approx(schedule.lr)
    assert lr_at(drop) == pytest.approx(schedule.lr * 0.1)


@pytest.mark.parametrize("preset", ["voc_ppal", "coco_ppal", "voc_miaod"])
def test_paper_presets_compose_with_both_backends(preset: str):
    tv = compose_config([f"experiment={preset}"])
    mm = compose_config([f"experiment={preset}", "detector=mmdet_retinanet_r50"])
    assert tv.detector._target_.endswith("TorchvisionDetector")
    assert mm.detector._target_.endswith("MMDetDetector")
    for cfg in (tv, mm):  # the image scale of the protocol reaches either backend
        assert (cfg.detector.builder.min_size, cfg.detector.builder.max_size) in (
            (600, 1000),
            (800, 1333),
        )
        assert cfg.detector.pretrained_backbone == tv.detector.pretrained_backbone


def test_paper_preset_without_backbone_weights_is_one_line(tmp_path, monkeypatch):
    """The protocol starts from ImageNet weights: a missing local file fails before training,
    naming the file, after the (fabricated) VOC07+12 copy has been read."""
    monkeypatch.setenv("ALRUN_VOC_ROOT", str(make_vocdevkit(tmp_path / "VOCdevkit")))
    monkeypatch.setenv("ALRUN_WEIGHTS", str(tmp_path / "no-weights"))
    cfg = compose_config(["experiment=voc_ppal", "dataset.classes=[cat,dog]"])
    with pytest.raises(Exception) as err:
        build_experiment(cfg)
    error = cause(err.value)
    assert isinstance(error, AlrunError)
    message = str(error)
    assert "detector.pretrained_backbone" in message and "resnet50-0676ba61.pth" in message
    assert str(tmp_path / "no-weights") in message and "\n" not in message


def test_voc0712_reads_both_years_with_prefixed_ids(tmp_path, monkeypatch):
    monkeypatch.setenv("ALRUN_VOC_ROOT", str(make_vocdevkit(tmp_path / "VOCdevkit")))
    cfg = compose_config(["experiment=voc_ppal", "dataset.classes=[cat,dog]"])
    splits = instantiate(cfg.dataset)
    assert len(splits.pool) == 8 + 6 and len(splits.test) == 4
    assert {i.split("_")[0] for i in splits.pool.ids} == {"VOC2007", "VOC2012"}
    assert splits.classes == ("cat", "dog")


def test_voc0712_class_list_mismatch_is_one_line(tmp_path, monkeypatch):
    """The default 20 VOC classes against data holding only cat and dog: the listed classes that
    never occur are named; a data class missing from the list is named too."""
    monkeypatch.setenv("ALRUN_VOC_ROOT", str(make_vocdevkit(tmp_path / "VOCdevkit")))
    cfg = compose_config(["experiment=voc_ppal"])
    with pytest.raises(Exception) as err:
        instantiate(cfg.dataset)
    message = str(cause(err.value))
    assert isinstance(cause(err.value), DatasetError)
    assert "dataset.classes" in message and "'aeroplane'" in message and "never occur" in message
    cfg = compose_config(["experiment=voc_ppal", "dataset.classes=[cat]"])
    with pytest.raises(Exception) as err:
        instantiate(cfg.dataset)
    assert "unknown class 'dog'" in str(cause(err.value))


def test_voc0712_missing_annotations_is_one_line(tmp_path, monkeypatch):
    root = make_vocdevkit(tmp_path / "VOCdevkit")
    for xml in (root / "VOC2012" / "Annotations").iterdir():
        xml.unlink()
    (root / "VOC2012" / "Annotations").rmdir()
    monkeypatch.setenv("ALRUN_VOC_ROOT", str(root))
    with pytest.raises(Exception) as err:
        instantiate(compose_config(["experiment=voc_ppal"]).dataset)
    message = str(cause(err.value))
    assert f"{root / 'VOC2012' / 'Annotations'} does not exist" in message
    assert "prepare_voc.py" in message


def test_coco2017_layout_and_missing_pieces(tmp_path, monkeypatch):
    root = make_coco_root(tmp_path / "coco")
    monkeypatch.setenv("ALRUN_COCO_ROOT", str(root))
    splits = instantiate(compose_config(["experiment=coco_ppal"]).dataset)
    assert (len(splits.pool), len(splits.test)) == (8, 4)
    with pytest.raises(Exception) as err:  # a class list that does not match the categories
        instantiate(compose_config(["experiment=coco_ppal", "dataset.classes=[cat,zebra]"]).dataset)
    assert "['zebra'] are not among the categories" in str(cause(err.value))
    (root / "annotations" / "instances_val2017.json").unlink()
    with pytest.raises(Exception) as err:
        instantiate(compose_config(["experiment=coco_ppal"]).dataset)
    assert "instances_val2017.json does not exist" in str(cause(err.value))


@pytest.mark.parametrize("preset", CPU_PRESETS)
def test_cpu_preset_builds_on_the_shared_dataset(preset: str):
    shared_dataset(preset)
    exp = build_experiment(compose_config([f"experiment={preset}"]))
    assert exp.budget.rounds >= 3
    assert exp.budget.initial < len(exp.splits.pool)
    assert exp.detector.model.transform.min_size[0] >= 160  # the CPU image size, see the yaml


#: presets on detector=lite0_fcos -> (their dataset, the tiny-FCOS preset they mirror)
LITE0_PRESETS = {
    "bccd_lite0": ("bccd", "bccd"),
    "cards_lite0": ("cards", "cards"),
    "txlpbc_lite0": ("txl_pbc", "txl_pbc"),
}


@pytest.mark.parametrize("preset", sorted(LITE0_PRESETS))
def test_lite0_preset_builds_with_the_tiny_presets_budget(preset: str):
    """Same budget as the tiny-FCOS preset of the dataset, so the detectors compare round for
    round; the pretrained backbone frozen and its features cached."""
    dataset, mirrored = LITE0_PRESETS[preset]
    shared_dataset(dataset)
    cfg, tiny = compose_config([f"experiment={preset}"]), compose_config([f"experiment={mirrored}"])
    assert cfg.budget == tiny.budget
    exp = build_experiment(cfg)
    backbone = exp.detector.model.backbone
    assert type(backbone).__name__ == "Lite0FPN" and backbone.frozen_blocks == 16
    assert backbone._cache_args is not None
    assert exp.detector.model.transform.min_size[0] % 32 == 0


# --- the user's ./configs on the search path ------------------------------------------------
def write_user_configs(root: Path) -> None:
    (root / "configs" / "experiment").mkdir(parents=True)
    (root / "configs" / "dataset").mkdir(parents=True)
    (root / "configs" / "experiment" / "mine.yaml").write_text(
        "# @package _global_\n"
        "defaults:\n  - override /dataset: tiny_shapes\nname: mine\n"
        "budget:\n  initial: 6\n  per_round: 4\n  rounds: 1\n"
        "trainer:\n  iterations: 2\n  first_iterations: 3\n  warmup_iters: 1\n"
        "detector:\n  builder:\n    image_size: 64\n"
    )
    (root / "configs" / "dataset" / "tiny_shapes.yaml").write_text(
        "defaults:\n  - synthetic@_here_\n  - _self_\nnum_pool: 16\nnum_test: 4\nimage_size: 64\n"
    )


def test_user_configs_folder_is_on_the_search_path(tmp_path, monkeypatch):
    write_user_configs(tmp_path)
    monkeypatch.chdir(tmp_path)
    cfg = compose_config(["experiment=mine"])
    assert cfg.name == "mine" and cfg.dataset.num_pool == 16 and cfg.budget.initial == 6
    monkeypatch.chdir(REPO)  # without ./configs the user's names are unknown
    with pytest.raises(Exception, match="mine"):
        compose_config(["experiment=mine"])


@pytest.mark.integration
def test_cli_runs_a_user_preset_from_the_working_directory(tmp_path):
    """A whole (tiny) run of a preset and dataset config that live only in ./configs."""
    write_user_configs(tmp_path)
    import os

    env = {**os.environ, **ENV_RUN, "ALRUN_CACHE": str(tmp_path / "cache")}
    result = subprocess.run(
        [sys.executable, "-m", "alrun.cli", "experiment=mine", "quiet=true", "hydra.run.dir=run"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    results = (tmp_path / "run" / "results.csv").read_text().splitlines()
    assert len(results) == 1 + 2  # header + rounds 0 and 1
    assert "tiny_shapes" in (tmp_path / "run" / ".hydra" / "hydra.yaml").read_text()


# --- UDA over TXL-PBC's domains on the pretrained detector ---------------------------------
def test_txlpbc_uda_lite0_targets_bccd_from_the_other_domains():
    """The target domain is the pool and the test set, the other three domains the labelled
    source; supervision=full in its place (the yaml's command) keeps everything else: the same
    picks."""
    shared_dataset("txl_pbc")
    cfg = compose_config(["experiment=txlpbc_uda_lite0"])
    splits, regime = instantiate(cfg.dataset), instantiate(cfg.supervision)
    assert {r.domain for r in splits.pool.images} == {"BCCD"}
    assert {r.domain for r in splits.test.images} == {"BCCD"}
    assert type(regime).__name__ == "DomainAdaptation" and regime.target_domain == "BCCD"
    assert {r.domain for r in regime.source.images} == {"Raabin", "PBC", "BCD"}
    assert len(regime.source) == 848  # TXL-PBC's train split of those domains
    regime.check_data(splits)
    assert cfg.detector.builder._target_.endswith("lite0_fcos")
    baseline = ["supervision=full", "~supervision.target_domain", "~supervision.source"]
    baseline.append("~supervision.pseudo_threshold")
    full = compose_config(["experiment=txlpbc_uda_lite0", *baseline])
    assert type(instantiate(full.supervision)).__name__ == "FullSupervision"
    assert (full.budget, full.trainer, full.dataset) == (cfg.budget, cfg.trainer, cfg.dataset)


@pytest.mark.parametrize(
    ("override", "group", "message"),
    [
        ("dataset.domains=[BCCDX]", "dataset", r"^dataset\.domains: unknown domains \['BCCDX'\]"),
        (
            "supervision.source.domains=[Rabin]",
            "supervision",
            r"^supervision\.source: dataset\.domains: unknown domains \['Rabin'\]; known",
        ),
    ],
)
def test_txlpbc_uda_lite0_misspelt_domain_is_one_line(override: str, group: str, message: str):
    shared_dataset("txl_pbc")
    with pytest.raises(Exception) as err:
        instantiate(compose_config(["experiment=txlpbc_uda_lite0", override])[group])
    error = cause(err.value)
    assert isinstance(error, AlrunError) and "\n" not in str(error)
    assert re.search(message, str(error)), str(error)
