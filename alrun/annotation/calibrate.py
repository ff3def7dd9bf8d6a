"""``alrun-calibrate``: fit the cost model to the seconds real annotators took.

Each labelled image gives one equation: its seconds (Label Studio's ``lead_time``) = the cost
model's terms for what was drawn on it (boxes x ``box_s``, clicks x ``center_click_s``, ...,
an image with nothing x ``empty_image_s``). The prices are the non-negative least-squares
solution (:func:`scipy.optimize.nnls`); a price no image informs keeps its current value. The
result is written as a config preset, so simulated sweeps can be re-run at the team's prices::

    alrun-calibrate outputs/.../seed0 -o configs/cost/team.yaml
    alrun strategy=entropy +cost=team   # oracle=human: --key oracle.fallback.cost_model
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import nnls

from alrun.annotation.batch import ANSWERS
from alrun.errors import AlrunError
from alrun.io import atomic_write_bytes
from alrun.oracle import CostModel

#: the prices a fit can inform (``extreme_s``: no tool exports extreme clicking here)
PRICES = (
    "box_s",
    "center_click_s",
    "click_first_class_s",
    "click_extra_class_s",
    "verify_s",
    "image_label_per_class_s",
    "empty_image_s",
)


@dataclass(frozen=True)
class Fit:
    cost_model: CostModel
    fitted: tuple[str, ...]  # the prices the data informed
    images: int
    rmse_s: float  # of the fit, per image
    rmse_before_s: float  # of the cost model the fit started from


def terms(record: Mapping[str, Any]) -> dict[str, float]:
    """How many of each price one labelled image costs (as :meth:`CostModel.cost` counts)."""
    kind, n, k = record["kind"], int(record["objects"]), int(record.get("classes", 0))
    if kind == "image_label":
        return {"image_label_per_class_s": max(k, 1)}
    if kind == "click":
        return (
            {"click_first_class_s": 1, "click_extra_class_s": k - 1} if k else {"empty_image_s": 1}
        )
    per = {"box": "box_s", "center_click": "center_click_s", "verify": "verify_s"}.get(kind)
    if per is None:
        raise AlrunError(
            f"{record.get('_where', 'record')}: kind {kind!r}; expected one of "
            "box, center_click, click, verify, image_label"
        )
    return {per: n} if n else {"empty_image_s": 1}


def fit(records: Sequence[Mapping[str, Any]], start: CostModel | None = None) -> Fit:
    start = start or CostModel()
    timed = [r for r in records if r.get("real_s") is not None]
    if not timed:
        raise AlrunError(
            "calibrate: no image with recorded seconds (real_s); expected Label "
            "Studio imports (lead_time) or a times file"
        )
    rows = [terms(r) for r in timed]
    used = [p for p in PRICES if any(row.get(p) for row in rows)]
    a = np.asarray([[row.get(p, 0.0) for p in used] for row in rows], np.float64)
    b = np.asarray([float(r["real_s"]) for r in timed], np.float64)
    prices, _ = nnls(a, b)
    before = np.asarray([[row.get(p, 0.0) for p in used] for row in rows]) @ np.asarray(
        [getattr(start, p) for p in used]
    )
    values = asdict(start)
    for name, value in zip(used, prices):
        # CostModel prices must stay positive: a price fitted to 0 becomes 0.01 s
        values[name] = round(max(float(value), 0.01), 3)
    model = CostModel(**values)
    fitted_prices = np.asarray([getattr(model, p) for p in used])
    return Fit(model, tuple(used), len(timed), _rmse(a @ fitted_prices, b), _rmse(before, b))


def _rmse(pred: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(np.mean((pred - b) ** 2)))


def read_records(paths: Iterable[Path]) -> list[dict[str, Any]]:
    """Run directories (their ``annotation/*/answers.json``), ``answers.json`` files, or JSON
    Lines of ``{"kind", "objects", "classes", "real_s"}`` per image."""
    records: list[dict[str, Any]] = []
    for path in paths:
        if path.is_dir():
            found = sorted(path.glob(f"annotation/*/{ANSWERS}"))
            if not found:
                raise AlrunError(f"{path}: no annotation/*/{ANSWERS}; expected an oracle=human run")
            records.extend(read_records(found))
        elif not path.is_file():
            raise AlrunError(f"{path}: no such file or run directory")
        elif path.name == ANSWERS:
            records.extend(json.loads(path.read_text()).values())
        else:
            for number, line in enumerate(path.read_text().splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise AlrunError(
                        f"{path} line {number}: not JSON ({err.msg}); expected one "
                        'object per line: {"kind", "objects", "classes", "real_s"}'
                    ) from None
                if not isinstance(record, dict) or "kind" not in record or "objects" not in record:
                    raise AlrunError(f"{path} line {number}: expected 'kind' and 'objects'")
                records.append({**record, "_where": f"{path} line {number}"})
    return records


def preset(result: Fit, key: str) -> str:
    """The fitted cost model as a Hydra preset (``@package _global_``) setting ``key``."""
    values = asdict(result.cost_model)
    lines = [
        "# @package _global_",
        f"# cost model fitted by alrun-calibrate to {result.images} images (nnls): "
        f"rmse {result.rmse_s:.2f} s per image, {result.rmse_before_s:.2f} s before",
        f"# fitted: {', '.join(result.fitted)}; the other prices are the defaults",
    ]
    indent = ""
    for part in key.split("."):
        lines.append(f"{indent}{part}:")
        indent += "  "
    lines += [f"{indent}{f.name}: {values[f.name]}" for f in fields(CostModel)]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="alrun-calibrate", description=__doc__.splitlines()[0])
    parser.add_argument(
        "sources",
        nargs="+",
        type=Path,
        help="oracle=human run directories, answers.json or JSON Lines times files",
    )
    parser.add_argument(
        "-o",
        "--output",
        type=Path,
        default=Path("configs/cost/calibrated.yaml"),
        help="the preset to write (use it as +cost=<file name>)",
    )
    parser.add_argument(
        "--key",
        default="oracle.cost_model",
        help="where the cost model is (oracle=human|recorded: oracle.fallback.cost_model)",
    )
    args = parser.parse_args(argv)
    try:
        result = fit(read_records(args.sources))
        atomic_write_bytes(args.output, preset(result, args.key).encode())
    except AlrunError as err:
        print(f"alrun-calibrate: error: {err}", file=sys.stderr)
        return 2
    prices = ", ".join(f"{p}={getattr(result.cost_model, p)}" for p in result.fitted)
    print(
        f"fitted {prices} to {result.images} images: rmse {result.rmse_s:.2f} s per image "
        f"({result.rmse_before_s:.2f} s with the current prices)"
    )
    print(f"wrote {args.output}; use it with: alrun ... +cost={args.output.stem}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
