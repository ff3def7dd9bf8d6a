"""Command-line entry point: ``alrun`` (Hydra app: run, ``-m`` sweeps, ``--cfg``, ``--help``)."""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from omegaconf import DictConfig

from alrun.errors import AlrunError
from alrun.io import write_json
from alrun.loop import run_experiment
from alrun.progress import Reporter

log = logging.getLogger("alrun")


def user_error(err: BaseException) -> str | None:
    """The one-line message for a user mistake, or None for a genuine bug.

    Anything raised while instantiating a config group is the config's fault (a wrong key, a
    wrong type): it is reported as ``<group>: <error>`` naming the config key Hydra names.
    """
    top = err
    while isinstance(err, InstantiationException) and err.__cause__ is not None:
        err = err.__cause__
    if isinstance(err, AlrunError):
        return str(err)
    if isinstance(top, InstantiationException):
        key = re.search(r"full_key: (\S+)", str(top))
        detail = str(err).splitlines()[0] if str(err) else type(err).__name__
        return f"{key.group(1) if key else 'config'}: {detail}"
    if isinstance(err, FileNotFoundError):
        return f"file not found: {err.filename}"
    return None


@hydra.main(config_path="configs", config_name="run", version_base="1.3")
def main(cfg: DictConfig) -> None:
    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    quiet = multirun if cfg.get("quiet") is None else bool(cfg.quiet)
    out_dir = Path(hydra_cfg.runtime.output_dir)
    try:
        run_experiment(cfg, out_dir, Reporter(quiet=quiet))
    except Exception as err:  # noqa: BLE001 - user errors become one line; bugs re-raise
        message = user_error(err)
        if message is None:
            raise
        log.error(message)
        if multirun:  # one failing job is recorded and the sweep goes on
            write_json(out_dir / "error.json", {"error": message})
            return
        print(f"alrun: error: {message}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
