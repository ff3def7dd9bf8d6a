"""Every config file composes and instantiates (a config that cannot be built fails here)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from alrun.acquisition.strategies import Strategy
from alrun.annotation.oracle import HumanOracle
from alrun.budget import Budget
from alrun.data.coco import write_coco
from alrun.data.dataset import DatasetSplits
from alrun.data.synthetic import synthetic_dataset
from alrun.detectors.base import Detector, TrainSchedule
from alrun.errors import AlrunError
from alrun.logger import NullLogger
from alrun.loop import build_experiment
from alrun.oracle import SimulatedOracle
from alrun.recorded_oracle import RecordedOracle
from alrun.supervision.base import LabelRequest, Regime
from tests.data.fabricate import make_coco_root, make_vocdevkit
from tests.helpers import compose_config, shared_dataset

CONFIGS = Path(__file__).resolve().parents[1] / "alrun" / "configs"
GROUP_FILES = sorted(
    (p.parent.name, p.stem) for p in CONFIGS.glob("*/*.yaml") if p.parent.name != "experiment"
)
EXPERIMENTS = sorted(p.stem for p in CONFIGS.glob("experiment/*.yaml"))
#: presets on real datasets (tests/test_presets.py); the others run on the synthetic data
REAL_DATA_PRESETS = {
    "bccd", "bccd_lite0", "cards", "cards_lite0", "txl_pbc", "txlpbc_lite0", "txlpbc_uda_lite0",
    "voc_ppal", "coco_ppal", "voc_miaod", "voc_learning_loss",
}  # fmt: skip


def have_mmdet() -> bool:
    try:
        import mmdet  # noqa: F401
    except ImportError:
        return False
    return True


def _dataset_overrides(option: str, tmp_path: Path) -> list[str]:
    if option in ("bccd", "cards", "txl_pbc"):
        return [f"dataset.root={shared_dataset(option)}"]
    if option == "voc":
        return [f"dataset.root={shared_dataset('bccd')}", "dataset.skip_invalid=true"]
    if option == "yolo":
        return [f"dataset.root={shared_dataset('txl_pbc')}"]
    if option == "voc0712":
        root = make_vocdevkit(tmp_path / "VOCdevkit")
        return [f"dataset.root={root}", "dataset.classes=[cat,dog]"]
    if option == "coco2017":
        return [f"dataset.root={make_coco_root(tmp_path / 'coco')}"]
    if option == "coco":
        data = synthetic_dataset(12, image_size=64, split="coco-test")
        write_coco(data, tmp_path / "ann.json")
        return [f"dataset.annotation_file={tmp_path / 'ann.json'}"]
    return ["dataset.num_pool=20", "dataset.num_test=5", "dataset.image_size=64"]


def test_every_group_has_a_default_and_every_default_exists():
    """run.yaml's defaults list and the group directories must agree both ways: a group
    without a default is unreachable by default, a default without a file breaks every run."""
    defaults = {}
    for entry in OmegaConf.load(CONFIGS / "run.yaml").defaults:
        if isinstance(entry, DictConfig) or isinstance(entry, dict):
            ((group, option),) = dict(entry).items()
            if not group.startswith("override "):
                defaults[group] = option
    on_disk = {g for g, _ in GROUP_FILES}
    assert on_disk == {g for g, o in defaults.items() if o is not None}
    for group, option in defaults.items():
        if option is not None:
            assert (CONFIGS / group / f"{option}.yaml").is_file(), f"{group}={option}"


#: what each group's ``_target_`` must build (a config pointing elsewhere fails here)
GROUP_TYPES = {
    "budget": Budget,
    "oracle": (SimulatedOracle, RecordedOracle, HumanOracle),
    "strategy": Strategy,
    "trainer": TrainSchedule,
    "dataset": DatasetSplits,
    "logger": NullLogger,  # WandbLogger is one too; it imports wandb only when a run starts
}


@pytest.mark.parametrize(("group", "option"), GROUP_FILES, ids=[f"{g}/{o}" for g, o in GROUP_FILES])
def test_group_config_instantiates(group: str, option: str, tmp_path: Path):
    overrides = [f"{group}={option}"]
    if group == "dataset":
        overrides += _dataset_overrides(option, tmp_path)
    if (group, option) == ("oracle", "recorded"):  # needs a labels file
        labels = tmp_path / "labels.jsonl"
        labels.write_text('{"image_id": "a", "kind": "box", "labels": [], "boxes": []}\n')
        overrides.append(f"oracle.path={labels}")
    if (group, option) == ("supervision", "uda"):  # refuses to start without its domains
        overrides = ["experiment=uda_synthetic", "supervision.source.num_pool=4"]
    cfg = compose_config(overrides)
    if group == "detector" and option.startswith("mmdet_") and not have_mmdet():
        with pytest.raises(Exception, match="install_mmdet.sh") as err:  # the install hint
            instantiate(cfg.detector, num_classes=3, device="cpu")
        assert isinstance(err.value.__cause__ or err.value, AlrunError)
        return
    if group == "detector":
        obj = instantiate(cfg.detector, num_classes=3, device="cpu")
        assert obj.num_classes == 3
        assert isinstance(obj, Detector)
    elif group == "supervision":
        obj = instantiate(cfg[group])
        assert isinstance(obj, Regime) and obj.label_kind(LabelRequest(0)) in obj.label_kinds
    else:
        obj = instantiate(cfg[group])
        assert isinstance(obj, GROUP_TYPES[group]), type(obj)
    if group == "dataset":
        assert len(obj.pool) > 0 and len(obj.test) > 0


@pytest.mark.parametrize("experiment", sorted(set(EXPERIMENTS) - REAL_DATA_PRESETS))
def test_experiment_composes_and_builds(experiment: str):
    overrides = [f"experiment={experiment}"]
    if experiment == "uda_txl":  # TXL-PBC's domains: 3 blood-cell classes
        overrides.append(f"dataset.root={shared_dataset('txl_pbc')}")
    exp = build_experiment(compose_config(overrides))
    assert exp.budget.rounds >= 1
    assert len(exp.splits.classes) == (3 if experiment == "uda_txl" else 4)


def test_unknown_group_value_is_a_clear_error():
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException, match="strategy"):
        compose_config(["strategy=entropyy"])


@pytest.mark.parametrize(
    ("overrides", "run_dir"),
    [
        ([], "synthetic/entropy/seed0"),
        (["dataset=bccd", "strategy=random", "seed=2"], "bccd/random/seed2"),
        (["dataset=yolo", "dataset.root=/home/me/photos/"], "photos/entropy/seed0"),
        (["dataset=yolo", "dataset.root=exports/cards/data.yaml"], "cards/entropy/seed0"),
        (["dataset=coco", "dataset.annotation_file=a/train.json"], "train/entropy/seed0"),
    ],
)
def test_default_output_dirs_name_the_dataset(overrides, run_dir):
    """A second dataset in the same working directory gets its own runs (it used to be
    refused as 'a different config' in outputs/<name>/<strategy>/seed<seed>)."""
    from hydra import compose, initialize_config_module

    from alrun.config import register_resolvers

    register_resolvers()
    with initialize_config_module(config_module="alrun.configs", version_base="1.3"):
        cfg = compose(config_name="run", overrides=overrides, return_hydra_config=True)
    assert cfg.hydra.run.dir == f"outputs/default/{run_dir}"
    assert cfg.hydra.sweep.dir == f"outputs/default/{run_dir.split('/')[0]}/sweep"


def test_sweep_subdirs_cut_path_values_to_their_last_component():
    from alrun.config import short_dirname

    assert (
        short_dirname("dataset.root=/work/shared/datasets/bccd/,seed=0,strategy=random")
        == "dataset.root=bccd,seed=0,strategy=random"
    )
    assert short_dirname("seed=0,strategy=random") == "seed=0,strategy=random"
    assert short_dirname("seed=0,strategy/scorer=bald") == "seed=0,strategy-scorer=bald"
    assert short_dirname(r"detector.pretrained=C:\runs\best.pt") == "detector.pretrained=best.pt"


@pytest.mark.parametrize(
    ("overrides", "name"),
    [
        (["strategy=entropy", "strategy/selector=kcenter"], "entropy+selector=kcenter"),
        (["strategy=entropy", "strategy/selector=topk"], "entropy"),  # the preset's own choice
        (
            ["strategy=ppal", "strategy/scorer=entropy", "strategy/selector=kcenter"],
            "ppal+scorer=entropy+selector=kcenter",
        ),
        (["strategy=bald", "strategy/passes=ensemble"], "bald+passes=ensemble"),
        (["strategy=entropy", "strategy/selector=kcenter", "strategy.name=mine"], "mine"),
    ],
)
def test_a_composed_strategy_names_its_run(overrides, name):
    """A preset composed with another scorer, passes or selector gets its own strategy.name,
    hence its own run directory and report group (it used to share the preset's and be
    refused there as a different config)."""
    from hydra import compose, initialize_config_module
    from hydra.core.hydra_config import HydraConfig

    from alrun.config import register_resolvers

    register_resolvers()
    with initialize_config_module(config_module="alrun.configs", version_base="1.3"):
        cfg = compose(config_name="run", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    try:
        assert cfg.strategy.name == name
        assert cfg.hydra.run.dir == f"outputs/default/synthetic/{name}/seed0"
    finally:
        HydraConfig.instance().cfg = None
    # outside a Hydra app there is no command line to read: the preset's name
    assert compose_config(overrides).strategy.name == (
        "mine" if "strategy.name=mine" in overrides else overrides[0].split("=")[1]
    )
