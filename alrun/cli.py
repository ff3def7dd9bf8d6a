"""Command-line entry point: ``alrun`` (Hydra app: run, ``-m`` sweeps, ``--cfg``, ``--help``).

User mistakes end as one line ``alrun: error: <key or file>: <what was expected>``, then
``  see docs/<page>.md`` (the manual's page for that key), and exit 2;
Ctrl-C ends as ``alrun: interrupted; re-run the same command to resume`` and exit 130. Inside a
sweep a failing job (a user error or a bug) writes ``error.json`` into its directory (a bug also
``traceback.txt``) and the sweep goes on; the sweep
ends with a count of failed jobs (:mod:`alrun.callbacks`) and exits 1 when every job failed.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import sys
import traceback
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import hydra
import hydra._internal.utils as hydra_utils
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException, InstantiationException, MissingConfigException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from alrun import callbacks
from alrun.annotation.oracle import FILES, AwaitingLabels
from alrun.config import enable_user_configs, register_resolvers
from alrun.distributed import is_follower
from alrun.errors import DISK_ERRNOS, AlrunError
from alrun.io import atomic_write_bytes, remove_file, write_json
from alrun.loop import run_experiment
from alrun.progress import Reporter

log = logging.getLogger("alrun")

INTERRUPTED = "interrupted; re-run the same command to resume"


def user_error(err: BaseException) -> str | None:
    """The one-line message for a user mistake, or None for a genuine bug.

    Anything raised while instantiating a config group is the config's fault (a wrong key, a
    wrong type): it is reported as ``<key>: <error>`` naming the config key the user types.
    """
    top = err
    while isinstance(err, InstantiationException) and err.__cause__ is not None:
        err = err.__cause__
    if isinstance(err, AlrunError):
        return str(err)
    if isinstance(err, MissingMandatoryValue):
        key = err.full_key or "config"
        return f"{key}: required but not set; pass {key}=<value>"
    if isinstance(top, InstantiationException):
        match = re.search(r"full_key: (\S+)", str(top))
        key = match.group(1) if match else "config"
        detail = str(err).splitlines()[0] if str(err) else type(err).__name__
        unexpected = re.search(r"unexpected keyword argument '(\w+)'", detail)
        if unexpected:
            target = re.search(r"target '([\w.]+)'", str(top))
            where = f"{target.group(1)} (the chosen {key} config)" if target else f"this {key}"
            return (
                f"{key}.{unexpected.group(1)}: not a setting of {where}; remove the override "
                "or the preset that sets it"
            )
        return f"{key}: {detail}"
    if isinstance(err, FileNotFoundError):
        return f"file not found: {err.filename}"
    if isinstance(err, OSError) and err.errno in DISK_ERRNOS:
        where = err.filename or "output directory"
        return (
            f"{where}: cannot write ({err.strerror}); free space or choose a writable "
            "hydra.run.dir, then re-run the same command to resume"
        )
    return None


# The manual's page for an error, by the config key the message starts with.
DOCS_PAGES = (
    ("dataset", "docs/getting-started.md"),
    ("strategy", "docs/strategies.md"),
    ("supervision", "docs/supervision.md"),
    ("budget", "docs/budgets.md"),
    ("oracle.path", "docs/supervision.md"),  # imported labels (oracle=recorded)
    ("oracle.labels", "docs/annotators.md"),  # oracle=human
    ("oracle.partial", "docs/annotators.md"),
    ("oracle.missing", "docs/supervision.md"),
    ("oracle.kind", "docs/supervision.md"),  # label kinds
    ("oracle", "docs/budgets.md"),  # the cost model
    ("detector.builder", "docs/detectors.md"),  # image sizes, backbone weights, feature cache
    ("detector", "docs/clusters.md"),
    ("trainer.devices", "docs/clusters.md"),  # distributed training
    ("trainer.nodes", "docs/clusters.md"),
    ("metric", "docs/reports.md"),
    ("resume", "docs/crash-safety.md"),
)
_RUN_DIR_FILES = re.compile(r"state\.json|config\.json|round_\d+|\.lock\b")


def docs_page(message: str) -> str:
    """The docs page that explains what ``message`` (an ``alrun: error:`` line) is about."""
    key = message.split(": ", 1)[0].strip()
    crash_safety = ("another alrun process", "cannot write", "not an alrun", "torch threads")
    if any(needle in message for needle in crash_safety):
        return "docs/crash-safety.md"
    if "; detectors that have it: " in message:  # a missing capability (alrun.experiment)
        return "docs/reference/capabilities.md"
    for prefix, page in DOCS_PAGES:  # "budget.unit", "strategy=ppal", "supervision (Full...)"
        if key == prefix or (key.startswith(prefix) and key[len(prefix)] in ". ="):
            return page
    if message.startswith(("Could not", "In '")):  # a typo in a key or a group option
        return "docs/reference/config-groups.md"
    if _RUN_DIR_FILES.search(key):
        return "docs/crash-safety.md"
    if "/" in key or "file not found" in key:  # a data file or folder
        return "docs/getting-started.md"
    return "docs/configuration.md"


def print_error(message: str) -> None:
    """The one error line, then the manual's page for it."""
    print(f"alrun: error: {message}", file=sys.stderr)
    print(f"  see {docs_page(message)}", file=sys.stderr)


_GROUP_KEY = re.compile(
    r"(?<![\w.+/])((?:dataset|detector|supervision|strategy|budget|oracle|trainer)(?:\.\w+)+)"
)


def hint_keys(message: str, cfg: DictConfig) -> str:
    """Make the hints in ``message`` work as written: a key the composed config lacks can only
    be set as ``+key=...`` (Hydra refuses ``key=...``). The key the message is about (its
    start) is left as is."""
    head, sep, rest = message.partition(": ")
    if not sep:
        return message

    def fix(match: re.Match) -> str:
        key = match.group(1)
        try:
            absent = OmegaConf.select(cfg, key, default=_MISSING, throw_on_missing=True)
        except MissingMandatoryValue:  # in the schema, just not set yet (???)
            return key
        return f"+{key}" if absent is _MISSING else key

    return head + sep + _GROUP_KEY.sub(fix, rest)


_MISSING = object()


def _hydra_record() -> dict[str, str]:
    """``.hydra/`` as Hydra would write it; alrun writes it once, after checking the config."""
    hydra_cfg = HydraConfig.instance().cfg
    return {
        ".hydra/hydra.yaml": OmegaConf.to_yaml(hydra_cfg),
        ".hydra/overrides.yaml": OmegaConf.to_yaml(hydra_cfg.hydra.overrides.task),
    }


@hydra.main(config_path="configs", config_name="run", version_base="1.3")
def run(cfg: DictConfig) -> dict[str, str] | None:
    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    quiet = multirun if cfg.get("quiet") is None else cfg.quiet is True
    out_dir = Path(hydra_cfg.runtime.output_dir)
    record = {".hydra/config.yaml": OmegaConf.to_yaml(cfg), **_hydra_record()}
    # a sweep job's own files (error.json, traceback.txt, .hydra/); a rank > 0 of a
    # distributed job writes none of them (rank 0 writes the run dir: alrun.distributed)
    job_files = multirun and not is_follower(os.environ)
    try:
        if job_files:
            remove_file(out_dir / "error.json")  # from an earlier failed attempt of this job
        run_experiment(cfg, out_dir, Reporter(quiet=quiet), record_files=record)
    except AwaitingLabels as waiting:  # oracle=human: not a failure, people label next
        print(awaiting_message(waiting, sys.argv[1:]))
        return None
    except KeyboardInterrupt:
        print(f"alrun: {INTERRUPTED}", file=sys.stderr)
        sys.exit(130)
    except Exception as err:  # noqa: BLE001 - user errors become one line; bugs re-raise
        if job_files:  # a sweep job's dir is its own: the report finds it by .hydra/config.yaml
            _write_absent(out_dir, record)
        message = user_error(err)
        if message is None:
            if not multirun:
                raise
            return _record_bug(out_dir, err) if job_files else {"error": str(err)}
        message = hint_keys(message, cfg)
        log.error(message)
        if multirun:  # one failing job is recorded and the sweep goes on
            if job_files:
                write_json(out_dir / "error.json", {"error": message})
            return {"error": message}
        print_error(message)
        sys.exit(2)
    return None


def awaiting_message(waiting: AwaitingLabels, argv: list[str]) -> str:
    """What to do next when a batch went out to annotators: the files, the resuming command."""
    folder = waiting.folder
    args = [a for a in argv if not a.startswith(("oracle.labels=", "oracle.partial="))]
    command = " ".join(["alrun", *(shlex.quote(a) for a in args)])
    files = "\n".join(f"    {folder / name}" for name in FILES)
    return (
        f"alrun: awaiting labels: batch {waiting.batch} ({waiting.kind}), {waiting.waiting} of "
        f"{waiting.total} images; the run is saved as awaiting_labels\n"
        f"  files:\n{files}\n"
        "  label them: Label Studio (new project, Labeling Setup = labelstudio_config.xml, "
        "import labelstudio_tasks.json) or CVAT (images.txt, upload coco_prelabels.json as "
        "COCO 1.0)\n"
        "  export (Label Studio: JSON; CVAT: COCO 1.0), then resume with:\n"
        f"    {command} oracle.labels=<export.json>\n"
        f"  or drop the export into {folder / 'export'}/ and re-run: {command}"
    )


def _record_bug(out_dir: Path, err: Exception) -> dict[str, str]:
    """A sweep job that hit a bug: its traceback goes to ``traceback.txt`` and the log, the
    one-line summary to ``error.json``; the job returns normally so the sweep goes on (Hydra's
    sweepers re-raise a failed job's exception and would stop the whole sweep)."""
    trace = "".join(traceback.format_exception(type(err), err, err.__traceback__))
    message = "".join(traceback.format_exception_only(type(err), err)).strip().splitlines()[0]
    message = f"bug: {message} (traceback: {out_dir / 'traceback.txt'})"
    log.error("%s\n%s", message, trace)
    atomic_write_bytes(out_dir / "traceback.txt", trace.encode())
    write_json(out_dir / "error.json", {"error": message})
    return {"error": message}


def _write_absent(out_dir: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        if not (out_dir / name).exists():
            atomic_write_bytes(out_dir / name, text.encode())


def alrun_version() -> str:
    try:
        return version("alrun")
    except PackageNotFoundError:  # running from a checkout that is not installed
        from alrun import __version__

        return __version__


def composition_error(err: HydraException | OmegaConfBaseException) -> str:
    """Hydra's multi-line message for a bad override or group option, as one line."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    message = " ".join(lines[:2]) if lines[:1] and lines[0].startswith("Could not") else lines[0]
    if isinstance(err, MissingConfigException) and err.options:
        message += f"; available: {', '.join(err.options)}"
    return message


def _one_line_composition_errors(report: Callable) -> Callable:
    """Wrap Hydra's ``run_and_report`` so that config composition errors (a typo in a key or a
    group option) end as one ``alrun: error:`` line, exit 2; everything else, including
    ``HYDRA_FULL_ERROR=1``, keeps Hydra's own reporting."""

    def run_and_report(func: Callable):
        def guarded():
            try:
                return func()
            except (HydraException, OmegaConfBaseException) as err:
                if os.environ.get("HYDRA_FULL_ERROR") == "1":
                    raise
                print_error(composition_error(err))
                sys.exit(2)

        return report(guarded)

    return run_and_report


#: Hydra's "Only one of --run, --multirun, --cfg, --info ... can be specified", as alrun says it
MODES_MESSAGE = (
    "-m/--multirun, --cfg/-c, --info and --shell-completion cannot be combined: to see a sweep "
    "job's config, drop -m and give one value per key (alrun --cfg job strategy=random seed=0)"
)


def main() -> None:
    """``alrun``: alrun's own ``--version``, then the Hydra app, then the sweep's exit code."""
    if "--version" in sys.argv[1:]:
        print(f"alrun {alrun_version()}")
        return
    enable_user_configs()  # ./configs: the user's presets and dataset configs (alrun.config)
    register_resolvers()  # the default output directories name the dataset (configs/run.yaml)
    report = hydra_utils.run_and_report
    hydra_utils.run_and_report = _one_line_composition_errors(report)
    try:
        run()
    except ValueError as err:  # raised by Hydra before any job, outside run_and_report
        if not str(err).startswith("Only one of --run, --multirun, --cfg"):
            raise
        print(f"alrun: error: {MODES_MESSAGE}", file=sys.stderr)
        sys.exit(2)
    finally:
        hydra_utils.run_and_report = report
    if callbacks.LAST_SWEEP is not None and callbacks.LAST_SWEEP.all_failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
