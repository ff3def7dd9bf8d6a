"""Turn a comparison into files: PNG curves, a gallery, a self-contained HTML page and CSVs."""

from __future__ import annotations

import base64
import html
import io
import json
import sys
from pathlib import Path

import numpy as np

from alrun.io import atomic_write_bytes, write_csv
from alrun.report.analysis import (
    AXES,
    Comparison,
    curve_rows,
    health_line,
    health_rows,
    metric_range,
    table_rows,
)
from alrun.report.gather import Run, RunSet
from alrun.report.stats import MIN_SEEDS_TO_COMPARE

BASELINE_COLOUR = "#404040"  # the random baseline: always dark grey, dashed
COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")


def colours(groups: list[str], baseline: str) -> dict[str, str]:
    others = [g for g in groups if g != baseline]
    out = {g: COLOURS[i % len(COLOURS)] for i, g in enumerate(others)}
    if baseline in groups:
        out[baseline] = BASELINE_COLOUR
    return out


FLAG_COLOUR = "#e00000"  # rounds with a collapsed or floor-level model


def plot_curves(comparison: Comparison) -> bytes:
    """mAP vs images, boxes and annotation seconds: mean over seeds with a 95 % t band (from
    3 seeds on, clipped to the metric's range); a red x marks a round in which at least one
    seed's model had collapsed or was at the floor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    palette = colours(list(comparison.curves), comparison.baseline)
    low, high = metric_range(comparison.metric) or (-np.inf, np.inf)
    flagged_any = False
    fig, axes = plt.subplots(1, len(AXES), figsize=(5 * len(AXES), 4), sharey=True)
    for ax, (axis, label) in zip(axes, AXES.items()):
        for group, points in comparison.curves.items():
            x = np.array([p.x[axis] for p in points])
            y = np.array([p.y.mean for p in points])
            is_base = group == comparison.baseline
            ax.plot(
                x,
                y,
                marker="o",
                markersize=3,
                color=palette[group],
                linestyle="--" if is_base else "-",
                label=group,
            )
            with_ci = [p for p in points if p.y.half_width is not None and not p.y.too_wide]
            if with_ci:
                bands = [p.y.clipped(low, high) for p in with_ci]
                ax.fill_between(
                    [p.x[axis] for p in with_ci],
                    [b[0] for b in bands],  # type: ignore[index]
                    [b[1] for b in bands],  # type: ignore[index]
                    color=palette[group],
                    alpha=0.15,
                    linewidth=0,
                )
            flagged = [p for p in points if comparison.flagged_seeds(group, p.round)]
            if flagged:
                flagged_any = True
                ax.plot(
                    [p.x[axis] for p in flagged],
                    [p.y.mean for p in flagged],
                    linestyle="none",
                    marker="x",
                    markersize=8,
                    markeredgewidth=2,
                    color=FLAG_COLOUR,
                    zorder=5,
                )
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(
        f"{comparison.metric} (mean over seeds, 95% CI band from {MIN_SEEDS_TO_COMPARE} seeds)"
    )
    if flagged_any:
        axes[-1].plot(
            [],
            [],
            linestyle="none",
            marker="x",
            markeredgewidth=2,
            color=FLAG_COLOUR,
            label=f"collapsed/floor model (mAP50 < {comparison.floor_map50:g}), ≥ 1 seed",
        )
    axes[-1].legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def _read_json_or_empty(path: Path) -> dict:
    """A round file the report only decorates with (metrics, labelled, selection): missing or
    damaged, it is left out with a warning on stderr instead of stopping the whole report."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        print(
            f"alrun-report: warning: {path}: unreadable ({type(err).__name__}), left out",
            file=sys.stderr,
        )
        return {}
    return data if isinstance(data, dict) else {}


def _per_round_metrics(run: Run) -> list[dict]:
    out = []
    for r in range(len(run.rows)):
        path = run.path / f"round_{r:02d}" / "metrics.json"
        out.append(_read_json_or_empty(path))
    return out


def error_rows(run_set: RunSet) -> list[dict[str, str]]:
    """Per group and round: TIDE counts and AP50 impact, pool misses (means over seeds)."""
    rows = []
    for group, runs in run_set.groups.items():
        per_run = [_per_round_metrics(run) for run in runs]
        for r in range(max(len(m) for m in per_run)):
            found = [m[r] for m in per_run if len(m) > r and m[r]]
            if not found:
                continue
            row = {"group": group, "round": str(r), "seeds": str(len(found))}
            for key in ("fp", "missed", "wrong_class", "poor_loc", "both", "dupe"):
                values = [m[key] for m in found if key in m]
                row[key] = f"{np.mean(values):.1f}" if values else "–"
            for key in ("fp", "missed", "wrong_class", "poor_loc", "both", "dupe"):
                values = [
                    m["error_impact_AP50"][f"d_{key}"] for m in found if "error_impact_AP50" in m
                ]
                row[f"ΔAP50 {key}"] = f"{np.mean(values):+.3f}" if values else "–"
            misses = [m["pool_misses"] for m in found if m.get("pool_misses")]
            for part in ("selected", "rest"):
                values = [p[part]["missed_per_image"] for p in misses if p[part]["images"]]
                row[f"pool missed/img ({part})"] = f"{np.mean(values):.2f}" if values else "–"
            rows.append(row)
    return rows


def _image_files(run: Run, r: int) -> dict[str, str]:
    """Image id -> file, from the next round's labelled.json (it holds the images picked in r)."""
    files: dict[str, str] = {}
    for candidate in (r + 1, r):
        path = run.path / f"round_{candidate:02d}" / "labelled.json"
        if path.is_file():
            coco = _read_json_or_empty(path)
            for image in coco.get("images", []):
                files[str(image.get("alrun_id", image.get("file_name")))] = image["file_name"]
    return files


def _thumbnail(file: str, boxes: np.ndarray | None, scores: np.ndarray | None, size: int) -> str:
    from PIL import Image, ImageDraw

    with Image.open(file) as img:
        image = img.convert("RGB")
    scale = size / max(image.size)
    image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))))
    if boxes is not None and scores is not None:
        draw = ImageDraw.Draw(image)
        for box, score in zip(boxes * scale, scores):
            draw.rectangle(box.tolist(), outline=(255, 40, 40), width=1)
            draw.text((box[0] + 1, box[1] + 1), f"{score:.2f}", fill=(255, 255, 0))
    buffer = io.BytesIO()
    # JPEG: noisy thumbnails are 3x smaller than PNG (the README sweep page: 20 MB -> 6 MB)
    image.save(buffer, format="JPEG", quality=85, subsampling=0)  # 4:4:4 keeps 1-px red lines red
    return base64.b64encode(buffer.getvalue()).decode()


def gallery_html(run: Run, per_round: int = 8, size: int = 160, min_score: float = 0.3) -> str:
    """Each round's selected images (first ``per_round``) with the model's predicted boxes."""
    parts = []  # the caller's <summary> names the group and seed
    for r in range(len(run.rows)):
        selection_path = run.path / f"round_{r:02d}" / "selection.json"
        if not selection_path.is_file():
            continue
        selected = _read_json_or_empty(selection_path).get("selected", [])
        if not selected:
            continue
        preds_path = run.path / f"round_{r:02d}" / "preds.npz"
        preds = None
        note = (
            f"boxes: the round-{r} model's predictions with score ≥ {min_score}"
            if preds_path.is_file()
            else "no predicted boxes stored for this run (run with save_predictions=true "
            "to see them); images only"
        )
        if preds_path.is_file():
            with np.load(preds_path) as data:
                preds = {k: data[k] for k in data.files}
            if "boxes" not in preds:
                note = "preds.npz holds no boxes (this strategy does not predict); images only"
                preds = None
        files = _image_files(run, r)
        parts.append(
            f"<h4>round {r}: {len(selected)} images selected "
            f"(showing {min(per_round, len(selected))})</h4><p class=note>{html.escape(note)}</p>"
            "<div class=gallery>"
        )
        index = {}
        if preds is not None:
            index = {str(i): k for k, i in enumerate(preds["image_ids"])}
        for item in selected[:per_round]:
            image_id = str(item["image_id"])
            score = item["score"]
            score = f"{score:.4g}" if isinstance(score, (int, float)) else str(score)
            caption = f"{html.escape(image_id)}<br>image score {html.escape(score)}"
            boxes = scores = None
            if preds is not None and image_id in index:
                k = index[image_id]
                lo, hi = int(preds["offsets"][k]), int(preds["offsets"][k + 1])
                keep = preds["scores"][lo:hi] >= min_score
                boxes, scores = preds["boxes"][lo:hi][keep], preds["scores"][lo:hi][keep]
                caption += f"<br>{len(scores)} of {hi - lo} boxes ≥ {min_score}"
            file = files.get(image_id)
            if file is None or not Path(file).is_file():
                parts.append(
                    f"<figure><div class=missing>image file not found</div>"
                    f"<figcaption>{caption}</figcaption></figure>"
                )
                continue
            data = _thumbnail(file, boxes, scores, size)
            parts.append(
                f"<figure><img alt='{html.escape(image_id)}' src='data:image/jpeg;base64,{data}'>"
                f"<figcaption>{caption}</figcaption></figure>"
            )
        parts.append("</div>")
    return "\n".join(parts)


def _table(rows: list[dict[str, str]]) -> str:
    if not rows:
        return "<p>(none)</p>"
    head = "".join(f"<th>{html.escape(k)}</th>" for k in rows[0])
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row.values()) + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:1500px;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:13px}
td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}
th{background:#f2f2f2} .warn{color:#a33} .note{color:#555;font-size:13px}
.alert{border:2px solid #a33;padding:8px 12px;background:#fff3f3}
.gallery{display:flex;flex-wrap:wrap;gap:8px}
figure{margin:0;font-size:11px;text-align:center}
.missing{width:160px;height:160px;background:#eee;display:flex;align-items:center;
justify-content:center}
img.curves{max-width:100%}
"""


def _health_alert(run_set: RunSet, comparison: Comparison) -> str:
    line = health_line(comparison)
    if line is None:
        return ""
    names = {str(r.config.get("name")) for r in run_set.runs}
    smoke = (
        " experiment=smoke trains for a handful of iterations: its models are expected to look "
        "collapsed (it checks the pipeline, not accuracy)."
        if "smoke" in names
        else ""
    )
    return f"<p class='warn alert'><b>{html.escape(line)}.</b>{html.escape(smoke)}</p>"


GALLERY_CHOICES = ("all", "first", "none")


def galleries_html(run_set: RunSet, which: str = "all") -> str:
    """Galleries per group: ``all`` seeds (the first one unfolded, the others folded), the
    ``first`` seed only, or ``none`` (a smaller page)."""
    if which not in GALLERY_CHOICES:
        raise ValueError(f"gallery: expected one of {'|'.join(GALLERY_CHOICES)}, got {which!r}")
    if which == "none":
        return "<p>(galleries left out: --gallery none)</p>"
    parts = []
    for runs in run_set.groups.values():
        ordered = sorted(runs, key=lambda r: r.seed)
        for k, run in enumerate(ordered[: 1 if which == "first" else None]):
            summary = f"{html.escape(run.group)} · seed {run.seed}"
            parts.append(
                f"<details{' open' if k == 0 else ''}><summary><b>{summary}</b></summary>"
                f"{gallery_html(run)}</details>"
            )
    return "\n".join(parts)


def write_report(
    run_set: RunSet, comparison: Comparison, out_dir: Path, gallery: str = "all"
) -> dict[str, Path]:
    """Write report.html (self-contained), curves.png, summary.csv, curves.csv, errors.csv,
    health.csv."""
    out_dir.mkdir(parents=True, exist_ok=True)
    png = plot_curves(comparison)
    table = table_rows(comparison)
    errors = error_rows(run_set)
    health = health_rows(run_set, comparison)
    paths = {
        "html": out_dir / "report.html",
        "png": out_dir / "curves.png",
        "summary": out_dir / "summary.csv",
        "curves": out_dir / "curves.csv",
        "errors": out_dir / "errors.csv",
        "health": out_dir / "health.csv",
    }
    atomic_write_bytes(paths["png"], png)
    write_csv(paths["summary"], table)
    write_csv(paths["curves"], curve_rows(comparison))
    write_csv(paths["errors"], errors)
    write_csv(paths["health"], health)
    warnings = "".join(f"<li class=warn>{html.escape(w)}</li>" for w in run_set.warnings)
    alert = _health_alert(run_set, comparison)
    runs = [
        {"run": str(r.path), run_set.group_key: r.group, "seed": str(r.seed), "status": r.status}
        for r in (*run_set.runs, *run_set.failed, *run_set.empty)
    ]
    galleries = galleries_html(run_set, gallery)
    png_b64 = base64.b64encode(png).decode()
    page = f"""<!doctype html><html><head><meta charset="utf-8">
<title>alrun report</title><style>{STYLE}</style></head><body>
<h1>alrun report: {html.escape(comparison.metric)} by {html.escape(run_set.group_key)}</h1>
{alert}
<p>{len(run_set.runs)} runs in {len(run_set.groups)} groups; seeds are replicates. Intervals are
95 % Student-t intervals over seeds (none with a single seed). With 2 seeds t = 12.7, so an
interval spans about ±9 standard deviations: the table says "interval too wide to compare" and
the curves draw no band; bands are drawn from {MIN_SEEDS_TO_COMPARE} seeds on, clipped to the
metric's range. AULC: area under the {html.escape(comparison.metric)} curve over
{html.escape(comparison.budget_axis)} divided by its range. Paired differences use the seeds both
groups ran. Partial (unfinished) runs appear in the curves but not in the final, AULC or paired
numbers.</p>
{f"<ul>{warnings}</ul>" if warnings else ""}
<h2>Comparison</h2>{_table(table)}
<h2>Learning curves</h2>
<img class=curves alt="learning curves" src="data:image/png;base64,{png_b64}">
<h2>Model health (per group and seed)</h2>
<p class=note>Collapsed: the loop's flag (test mAP50 &lt; 0.01, or the training loss did not fall
when training from scratch; alrun/diagnostics.py). Floor: test mAP50 &lt;
{comparison.floor_map50:g}, a model that detects almost nothing. Such a model's selections are
close to arbitrary and shape every later round of its seed, so a paired comparison with such a
seed on either side is marked "not comparable" instead of (not) significant; on the curves a
red x marks a round where at least one seed had one.</p>{_table(health)}
<h2>Failure modes (TIDE, test split) and pool misses</h2>
<p class=note>Counts at the run's metric.failure_score_threshold; ΔAP50: AP50 gained by fixing
that error type (Bolya et al. 2020); pool missed/img: ground-truth objects the round's model
misses per image among the images it selected vs the rest of the pool.</p>{_table(errors)}
<h2>Runs</h2>{_table(runs)}
<h2>Selected images (per group and seed; click a seed to unfold it)</h2>{galleries}
</body></html>
"""
    atomic_write_bytes(paths["html"], page.encode())
    return paths
