"""Compose alrun's Hydra config from Python (tests, notebooks, benchmarks), and put the user's
own ``./configs`` folder on Hydra's search path."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_module
from hydra.core.config_search_path import ConfigSearchPath
from hydra.core.plugins import Plugins
from hydra.plugins.search_path_plugin import SearchPathPlugin
from omegaconf import DictConfig

from alrun.resolvers import (
    composed_strategy_name,
    dataset_tag,
    register_resolvers,
    short_dirname,
)
from alrun.rundir import RUN_CONTROL_KEYS, RunOptions

__all__ = [
    "RUN_CONTROL_KEYS",
    "RunOptions",
    "compose_config",
    "composed_strategy_name",
    "dataset_tag",
    "enable_user_configs",
    "register_resolvers",
    "short_dirname",
]

#: a folder of this name in the working directory is on the config search path
USER_CONFIG_DIR = "configs"
#: how alrun's packaged configs appear on the search path (pkg://alrun.configs, or the
#: file:// path of alrun/configs when Hydra resolves the CLI's config_path as a folder)
_PACKAGED = ("alrun.configs", "alrun/configs")


class UserConfigs(SearchPathPlugin):
    """Appends ``<working directory>/configs`` to alrun's search path when that folder exists.

    Users keep presets and dataset configs in ``./configs/<group>/<name>.yaml`` (e.g.
    ``configs/experiment/mine.yaml`` with ``# @package _global_``) and select them as
    ``experiment=mine`` without touching the package. The packaged configs come first, so a
    user file with a packaged name is shadowed: pick another name. Only alrun's own apps are
    touched (the search path must hold ``alrun.configs``).
    """

    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        folder = Path.cwd() / USER_CONFIG_DIR
        paths = [entry.path for entry in search_path.get_path()]
        wanted = f"file://{folder.resolve()}"
        ours = any(path.rstrip("/").endswith(_PACKAGED) for path in paths)
        if ours and folder.is_dir() and wanted not in paths:
            search_path.append("alrun-user", wanted)


def enable_user_configs() -> None:
    """Register :class:`UserConfigs` with Hydra (idempotent; the CLI and ``compose_config``
    call it)."""
    if UserConfigs not in Plugins.instance().discover(SearchPathPlugin):
        Plugins.instance().register(UserConfigs)


def compose_config(overrides: list[str] | None = None) -> DictConfig:
    """The config ``alrun <overrides>`` would run, without starting a Hydra app (``./configs``
    is on the search path, as for the command line)."""
    enable_user_configs()
    register_resolvers()
    with initialize_config_module(config_module="alrun.configs", version_base="1.3"):
        return compose(config_name="run", overrides=list(overrides or []))
