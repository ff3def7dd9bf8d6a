"""The generated pages of the docs site, made from the package itself so they cannot go stale.

``mkdocs build`` loads this file as a hook (mkdocs.yml ``hooks:``): ``on_files`` adds
``reference/strategies.md`` (every ``strategy=`` option: family, what it asks the detector to
compute, what its yaml says and cites), ``reference/config-groups.md`` (every group and
option with its header comment) and ``reference/capabilities.md`` (which strategy and regime runs
on which detector, :mod:`alrun.matrix`). ``python scripts/docs_pages.py DIR`` writes them to DIR.
"""

from __future__ import annotations

import functools
import re
import sys
from dataclasses import dataclass, fields
from pathlib import Path

from hydra import compose, initialize_config_module
from hydra.utils import get_object, instantiate

import alrun
from alrun.detectors.base import CAPABILITIES
from alrun.matrix import MATRIX_DETECTORS, cells, counts, detector_capabilities
from alrun.resolvers import register_resolvers
from alrun.types import Needs

CONFIGS = Path(alrun.__file__).parent / "configs"
GROUPS = ("dataset", "detector", "supervision", "strategy", "strategy/scorer", "strategy/passes",
          "strategy/selector", "budget", "oracle", "trainer", "logger", "experiment",
          "hydra/launcher")  # fmt: skip
STRATEGIES_PAGE = "reference/strategies.md"
GROUPS_PAGE = "reference/config-groups.md"
CAPABILITIES_PAGE = "reference/capabilities.md"

# "Sener & Savarese 2018", "Choi et al., "<title>", ICCV 2021", "Kao et al. 2018", "Cordier et al."
_CITATION = re.compile(
    r"([A-Z][\w-]+(?: et al\.| & [A-Z][\w-]+))(?:,? \"[^\"]+\",)?((?:,? (?:[A-Z]{2,} )?\d{4})?)"
)
SUMMARY_CHARS = 160  # the table's "what it does": the header's first sentence, this long at most


@dataclass(frozen=True)
class StrategyRow:
    name: str
    family: str
    needs: str
    description: str
    reference: str


def header_comment(path: Path) -> str:
    """The comment block a config file starts with, as one paragraph (``# @package`` lines
    are Hydra directives, not text)."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        text = line.lstrip("#").strip()
        if not text.startswith("@package"):
            lines.append(text)
    return " ".join(lines).strip()


def summary(text: str) -> str:
    """The first sentence of a header comment, without its citations (the reference column
    has them), cut at ``SUMMARY_CHARS``."""
    text = re.sub(r" ?\((?:[^()]*\d{4}|[^()]*et al\.[^()]*)\)", "", text)  # "(Kao et al. 2018)"
    text = re.sub(r" ?\([\w./]+\.(?:py|yaml)\)", "", text)  # "(base/multipass.yaml)": see the code
    first = re.split(r"(?<=[a-z0-9)])(?<! al)\. ", text, maxsplit=1)[0].rstrip(".")
    return first if len(first) <= SUMMARY_CHARS else first[: SUMMARY_CHARS - 1].rstrip() + "…"


def _citations(text: str) -> list[str]:
    return [name + year for name, year in _CITATION.findall(text)]


def references(header: str, cfg) -> str:
    """The works the yaml's header cites, else those the docstrings of the classes and
    functions it names (``_target_``: scorer, box score, selector) cite."""
    found = _citations(header)
    for node in (cfg.scorer, cfg.scorer.get("box_score") or {}, cfg.get("selector") or {}):
        target = node.get("_target_") if hasattr(node, "get") else None
        if not found and target:
            found += _citations(" ".join((get_object(target).__doc__ or "").split()))
    return "; ".join(dict.fromkeys(found)) or "–"


def family(scorer: str, selector: str, source: str | None) -> str:
    """A strategy's family from its scorer's and selector's ``_target_``."""
    if selector.endswith(".TwoPhase") or ".combine." in scorer:
        return "hybrid"
    if scorer.endswith(".RandomScore"):
        return "baseline" if selector.endswith(".TopK") else "diversity"
    if ".learned." in scorer or ".miaod." in scorer:  # heads trained with the detector
        return "learned"
    if ".compas." in scorer:  # boxes ranked across the pool, no image selector
        return "box-level queries"
    if ".qbc." in scorer:  # a committee of ensemble members
        return "uncertainty, multi-pass (ensemble)"
    if ".heuristics." in scorer:
        return "heuristic"
    if source and source != "none":
        return f"uncertainty, multi-pass ({source.replace('_', ' ')})"
    return "uncertainty, one pass"


def describe_needs(needs: Needs) -> str:
    """What differs from a plain single pass, in words; random asks for no prediction at all."""
    if not needs.detections and needs == Needs(detections=False):
        return "nothing (no prediction)"
    default = Needs()
    words = []
    for field in fields(Needs):
        value = getattr(needs, field.name)
        if field.name == "detections" or value == getattr(default, field.name):
            continue
        if value is True:
            words.append(field.name.replace("_", " "))
        elif isinstance(value, tuple):
            words.append("views " + ", ".join(value))
        else:
            words.append(f"{field.name.replace('_', ' ')} {value}")
    return "; ".join(words) or "detections"


@functools.cache
def strategy_rows() -> tuple[StrategyRow, ...]:
    """One row per ``alrun/configs/strategy/*.yaml``, from the composed and built strategy
    (the packaged configs only: a user's ./configs is no part of the manual)."""
    rows = []
    register_resolvers()  # the presets' ${alrun_strategy_name:...}
    with initialize_config_module(config_module="alrun.configs", version_base="1.3"):
        configs = {
            path: compose(config_name="run", overrides=[f"strategy={path.stem}"]).strategy
            for path in sorted((CONFIGS / "strategy").glob("*.yaml"))
        }
    for path, cfg in configs.items():
        strategy = instantiate(cfg)
        scorer = str(cfg.scorer.get("_target_", ""))
        selector = str((cfg.get("selector") or {}).get("_target_", ""))
        text = header_comment(path)
        rows.append(StrategyRow(
            name=path.stem,
            family=family(scorer, selector, cfg.scorer.get("source")),
            needs=describe_needs(strategy.needs),
            description=summary(text),
            reference=references(text, cfg),
        ))  # fmt: skip
    return tuple(rows)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def strategies_page() -> str:
    rows = strategy_rows()
    lines = [
        "# Strategies (generated)",
        "",
        "Generated by `scripts/docs_pages.py` from `alrun/configs/strategy/*.yaml` at every docs",
        "build: the family comes from the scorer's and selector's `_target_`, *needs* from the",
        "built strategy's `Needs` (what the detector computes beyond one pass of detections), the",
        "description and references from the yaml's header comment. Use one as",
        "`alrun strategy=<name>`; how they work and compare: [Strategies](../strategies.md).",
        "",
        "| strategy | family | needs | what it does | reference |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| `{r.name}` | {r.family} | {_cell(r.needs)} | {_cell(r.description)} | "
        f"{_cell(r.reference)} |"
        for r in rows
    ]
    return "\n".join(lines) + "\n"


def config_groups_page() -> str:
    lines = [
        "# Config groups (generated)",
        "",
        "Generated by `scripts/docs_pages.py` from `alrun/configs/` at every docs build. Choose",
        "an option with `alrun <group>=<option>`; `alrun --cfg job` prints the composed config",
        "with every key. Defaults: `alrun/configs/run.yaml`.",
    ]
    for group in GROUPS:
        lines += ["", f"## `{group}`", "", "| option | what its file says |", "|---|---|"]
        for path in sorted((CONFIGS / group).glob("*.yaml")):
            text = header_comment(path) or "–"
            lines.append(f"| `{path.stem}` | {_cell(text)} |")
    return "\n".join(lines) + "\n"


def _matrix_table(group: str, detectors: tuple[str, ...]) -> list[str]:
    by_option: dict[str, dict[str, str]] = {}
    for cell in cells(detectors):
        if cell.group == group:
            text = "runs" if cell.runs else "refused: needs " + ", ".join(sorted(cell.missing))
            by_option.setdefault(cell.option, {})[cell.detector] = text
    lines = [
        f"| {group}= | " + " | ".join(f"`{d}`" for d in detectors) + " |",
        "|---|" + "---|" * len(detectors),
    ]
    for option, row in by_option.items():
        lines.append(f"| `{option}` | " + " | ".join(row[d] for d in detectors) + " |")
    return lines


def capabilities_page() -> str:
    detectors = MATRIX_DETECTORS
    declared = detector_capabilities(detectors)
    total = counts(cells(detectors))
    lines = [
        "# Capabilities: what runs on which detector (generated)",
        "",
        "Generated by `scripts/docs_pages.py` (`alrun/matrix.py`) at every docs build, from",
        "what each strategy and regime `requires` and what each detector config declares",
        "(`alrun/detectors/base.py`); no model is built. `alrun` refuses a refused cell at",
        "start-up, before any data is read, with one line naming the regime or the part of the",
        "strategy that asks (`strategy.scorer`, its `strategy/passes`, `strategy.selector`),",
        "the capability and the detectors that have it. Ensembles and test-time views need nothing",
        "of the detector beyond predictions on image tensors (`alrun/detectors/passes.py`).",
        "",
        "## Capabilities",
        "",
        "| capability | meaning | " + " | ".join(f"`{d}`" for d in detectors) + " |",
        "|---|---|" + "---|" * len(detectors),
    ]
    for name, meaning in CAPABILITIES.items():
        marks = ["yes" if name in (declared[d][0] or ()) else "–" for d in detectors]
        lines.append(f"| `{name}` | {_cell(meaning)} | " + " | ".join(marks) + " |")
    lines += ["", "## Cells that run", "", "| detector | strategies | regimes |", "|---|---|---|"]
    n_strategies = len({c.option for c in cells(detectors) if c.group == "strategy"})
    n_regimes = len({c.option for c in cells(detectors) if c.group == "supervision"})
    for d in detectors:
        row = total[d]
        lines.append(
            f"| `{d}` | {row['strategy']} of {n_strategies} | {row['supervision']} of {n_regimes} |"
        )
    lines += ["", "## Strategies", "", *_matrix_table("strategy", detectors)]
    lines += ["", "## Supervision regimes", "", *_matrix_table("supervision", detectors)]
    return "\n".join(lines) + "\n"


def pages() -> dict[str, str]:
    return {
        STRATEGIES_PAGE: strategies_page(),
        GROUPS_PAGE: config_groups_page(),
        CAPABILITIES_PAGE: capabilities_page(),
    }


def on_files(files, config):  # mkdocs hook
    from mkdocs.structure.files import File

    for uri, content in pages().items():
        files.append(File.generated(config, uri, content=content))
    return files


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "site-generated")
    for uri, content in pages().items():
        (out / uri).parent.mkdir(parents=True, exist_ok=True)
        (out / uri).write_text(content)
        print(out / uri)
