"""The OmegaConf resolvers of alrun's configs (output directories, composed strategy names).

Low in the import layers so that whatever composes or reads a config (the CLI, the report, the
capability matrix, the manual's generator) can register them without importing the CLI's
config module."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

__all__ = ["composed_strategy_name", "dataset_tag", "register_resolvers", "short_dirname"]


def dataset_tag(dataset: DictConfig | dict | None) -> str:
    """A short folder name for a dataset config (``hydra.run.dir`` / ``hydra.sweep.dir``): the
    name of its ``root`` (or annotation file), else its reader (``synthetic``). Two datasets used
    from the same working directory then write to different folders instead of the second being
    refused as "a different config"."""
    dataset = dataset or {}
    for key in ("root", "annotation_file", "image_dir"):
        try:
            value = dataset.get(key)
        except Exception:  # noqa: BLE001 - a ??? value: fall through to the reader's name
            value = None
        if value:
            path = Path(str(value)).expanduser()
            if path.suffix.lower() in (".yaml", ".yml", ".json"):
                name = path.parent.name if key == "root" else path.stem
            else:
                name = path.name
                if name in ("", ".", ".."):  # never a folder name that climbs out of outputs/
                    name = path.resolve().name
            if name:
                return _safe(name)
    target = str(dataset.get("_target_") or "dataset").rsplit(".", 1)[-1]
    return _safe(target.removesuffix("_splits") or "dataset")


def short_dirname(override_dirname: str) -> str:
    """Hydra's ``override_dirname`` with every path value cut to its last component, so that
    ``dataset.root=/home/me/photos`` gives a sweep sub-directory ``dataset.root=photos,...``
    rather than a tree of folders named after the path. A nested group's key
    (``strategy/scorer=bald``) is written ``strategy-scorer=bald`` for the same reason."""
    items = []
    for item in override_dirname.split(","):
        key, sep, value = item.partition("=")
        key = key.replace("/", "-")
        if sep and ("/" in value or "\\" in value):
            value = _safe(Path(value.replace("\\", "/").rstrip("/")).name or "root")
        items.append(f"{key}{sep}{value}")
    return ",".join(items)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.=+" else "_" for c in name)


def _preset_defaults(preset: str) -> dict[str, str | None]:
    """The ``strategy/<group>: option`` choices a packaged strategy preset composes by itself
    (its defaults list); empty for a preset alrun does not ship (a user's own)."""
    path = Path(__file__).parent / "configs" / "strategy" / f"{preset}.yaml"
    if not path.is_file():
        return {}
    defaults = OmegaConf.load(path).get("defaults") or []
    return {
        str(key): (None if value is None else str(value))
        for item in defaults
        if isinstance(item, DictConfig)
        for key, value in item.items()
    }


def composed_strategy_name(preset: str) -> str:
    """``strategy.name`` of a run: the preset's name, plus every ``strategy/<group>=<option>``
    of the command line that differs from what the preset composes by itself.

    ``alrun strategy=entropy strategy/selector=kcenter`` is then ``entropy+selector=kcenter``:
    it gets its own run directory and its own group in ``alrun-report`` instead of colliding
    with plain entropy's. Outside a Hydra app (``compose_config``) there is no command line to
    read and the preset's name is returned; ``strategy.name=...`` still overrides it all."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return preset
    defaults = _preset_defaults(preset)
    parts = []
    for override in HydraConfig.get().overrides.task:
        key, sep, value = str(override).lstrip("+~").partition("=")
        if not sep or not key.startswith("strategy/"):
            continue
        group = key.removeprefix("strategy/")
        chosen = None if value in ("null", "") else value
        if group in defaults and defaults[group] == chosen:
            continue
        parts.append(f"{group}={value}")
    return "+".join([preset, *parts])


def register_resolvers() -> None:
    """``${alrun_dataset:${dataset}}`` and ``${alrun_short:${hydra.job.override_dirname}}``,
    used by the default output directories in run.yaml, and ``${alrun_strategy_name:<preset>}``
    of the strategy presets (idempotent)."""
    for name, func in (
        ("alrun_dataset", dataset_tag),
        ("alrun_short", short_dirname),
        ("alrun_strategy_name", composed_strategy_name),
    ):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, func)
