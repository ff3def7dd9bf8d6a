"""alrun-report on fabricated run directories with hand-computed numbers."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from alrun.report.analysis import compare, table_rows
from alrun.report.cli import build, main
from alrun.report.gather import ReportError, gather
from alrun.report.stats import aulc, mean_ci, t_quantile

REPO = Path(__file__).resolve().parents[1]
COST = [250.0, 500.0, 750.0]
FINALS = {
    "random": [0.30, 0.34, 0.32],
    "entropy": [0.36, 0.41, 0.37],  # paired diffs 0.06, 0.07, 0.05
    "margin": [0.28, 0.33, 0.31],  # paired diffs -0.02, -0.01, -0.01; mean 0.3067 < 0.32
}
SECOND = {"random": 0.2, "entropy": 0.25, "margin": 0.2}


def make_run(
    root: Path,
    strategy: str,
    seed: int,
    maps: list[float],
    rounds: int | None = None,
    dataset: str = "synthetic",
    per_round: int = 10,
    stopped: str | None = None,
    error: str | None = None,
    map50: list[float] | None = None,
    collapsed: list[int] | None = None,
) -> Path:
    """A run directory as alrun writes it (config, results.csv, state.json, round dirs)."""
    run = root / f"strategy={strategy},seed={seed}"
    (run / ".hydra").mkdir(parents=True)
    config = {
        "seed": seed,
        "dataset": {"_target_": "alrun.data.synthetic.synthetic_splits", "name": dataset},
        "strategy": {"name": strategy},
        "budget": {
            "unit": "images",
            "initial": 10,
            "per_round": per_round,
            "rounds": len(maps) - 1 if rounds is None else rounds,
        },
        "metric": {"protocol": "coco"},
    }
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    if error is not None:
        (run / "error.json").write_text(json.dumps({"error": error}))
        return run
    map50 = map50 or [m + 0.2 for m in maps]
    header = "round,images,boxes,clicks,cost_s,mAP,mAP50,mAR,fp,missed"
    header += ",collapsed\n" if collapsed is not None else "\n"
    lines = [
        f"{r},{10 + per_round * r},{30 + 30 * r},0,{COST[r]},{m},{map50[r]},0.5,3,4"
        + (f",{collapsed[r]}\n" if collapsed is not None else "\n")
        for r, m in enumerate(maps)
    ]
    (run / "results.csv").write_text(header + "".join(lines))
    (run / "state.json").write_text(
        json.dumps({"last_completed_round": len(maps) - 1, "stopped": stopped})
    )
    for r in range(len(maps)):
        (run / f"round_{r:02d}").mkdir()
        metrics = {
            "fp": 3 + r,
            "missed": 4,
            "wrong_class": 1,
            "poor_loc": 2,
            "both": 0,
            "dupe": 1,
            "error_impact_AP50": {
                f"d_{k}": 0.01 * r
                for k in ("fp", "missed", "wrong_class", "poor_loc", "both", "dupe")
            },
        }
        (run / f"round_{r:02d}" / "metrics.json").write_text(json.dumps(metrics))
    return run


def sweep(root: Path, strategies=("random", "entropy", "margin"), seeds=(0, 1, 2)) -> Path:
    for name in strategies:
        for seed in seeds:
            make_run(root, name, seed, [0.1, SECOND[name], FINALS[name][seed]])
    return root


def test_t_quantiles_match_tables():
    # two-sided 95 % Student t critical values (any statistics table)
    for df, value in ((1, 12.706), (2, 4.303), (4, 2.776), (9, 2.262), (30, 2.042)):
        assert t_quantile(0.975, df) == pytest.approx(value, abs=5e-4)


def test_mean_ci_and_aulc_hand_computed():
    est = mean_ci([0.30, 0.34, 0.32])  # sd 0.02 -> half width 4.3027 * 0.02 / sqrt(3)
    assert est.mean == pytest.approx(0.32)
    assert est.half_width == pytest.approx(4.302653 * 0.02 / 3**0.5, rel=1e-5)
    single = mean_ci([0.3])
    assert single.half_width is None and "no CI" in single.text()
    # trapezoids (10 * 0.15 + 10 * 0.25) over the range 20
    assert aulc([10, 20, 30], [0.1, 0.2, 0.3]) == pytest.approx(0.2)
    assert aulc([10, 20, 40], [0.1, 0.3, 0.3]) == pytest.approx((10 * 0.2 + 20 * 0.3) / 30)


def test_comparison_table_hand_computed(tmp_path):
    comparison = compare(gather([sweep(tmp_path)]), "mAP")
    by = {s.group: s for s in comparison.summaries}
    assert comparison.baseline_final == pytest.approx(0.32)
    assert by["random"].final.half_width == pytest.approx(4.302653 * 0.02 / 3**0.5, rel=1e-5)
    # AULC of random seed 0: (10 * 0.15 + 10 * (0.2 + 0.3) / 2) / 20 = 0.2
    assert by["random"].aulc.mean == pytest.approx(np.mean([0.2, 0.21, 0.205]))
    entropy = by["entropy"].versus_baseline
    assert entropy.estimate.mean == pytest.approx(0.06)
    assert entropy.estimate.half_width == pytest.approx(4.302653 * 0.01 / 3**0.5, rel=1e-5)
    assert entropy.verdict.startswith("significant")
    margin = by["margin"].versus_baseline
    assert margin.estimate.mean == pytest.approx(-0.04 / 3)
    assert margin.verdict.startswith("not significant")
    assert by["entropy"].reach_cost_s == 750.0 and by["entropy"].reach_images == 30.0
    assert by["margin"].reach_cost_s is None
    rows = {r["group"]: r for r in table_rows(comparison)}
    assert rows["margin"]["cost to reach random's final mAP"] == "not reached"
    assert rows["random"]["final mAP (95% CI)"] == "0.320 ± 0.050 (n=3)"


def test_single_seed_says_no_ci(tmp_path):
    comparison = compare(gather([sweep(tmp_path, seeds=(0,))]))
    rows = {r["group"]: r for r in table_rows(comparison)}
    assert "no CI: needs ≥ 2 seeds" in rows["entropy"]["final mAP (95% CI)"]
    assert (
        "cannot compute a CI from 1 paired seed"
        in rows["entropy"]["paired diff vs random (final mAP)"]
    )


def test_report_files_and_html(tmp_path):
    runs = sweep(tmp_path / "sweep")
    _, _, files = build([runs], tmp_path / "out")
    page = files["html"].read_text()
    png = re.search(r'class=curves alt="learning curves" src="data:image/png;base64,([^"]+)"', page)
    assert Image.open(io.BytesIO(base64.b64decode(png.group(1)))).size[0] > 500
    assert "0.320 ± 0.050 (n=3)" in page and "not reached" in page
    assert "no predicted boxes stored for this run" not in page  # no selection.json at all here
    summary = files["summary"].read_text().splitlines()
    assert len(summary) == 4 and summary[1].startswith("entropy,0 1 2,complete")
    curves = files["curves"].read_text().splitlines()
    assert len(curves) == 1 + 3 * 3
    errors = files["errors"].read_text().splitlines()
    assert errors[1].startswith("entropy,0,3,3.0,4.0")  # fp 3 in round 0, mean over 3 seeds


def test_bad_inputs_give_clear_messages(tmp_path):
    with pytest.raises(ReportError, match="no run directories found"):
        gather([tmp_path])
    with pytest.raises(ReportError, match="no such directory"):
        gather([tmp_path / "nope"])
    mixed = tmp_path / "mixed"
    make_run(mixed, "random", 0, [0.1, 0.2])
    make_run(mixed, "entropy", 0, [0.1, 0.2], dataset="bccd")
    with pytest.raises(ReportError, match="2 different datasets"):
        gather([mixed])
    budgets = tmp_path / "budgets"
    make_run(budgets, "random", 0, [0.1, 0.2])
    make_run(budgets, "entropy", 0, [0.1, 0.2], per_round=20)
    with pytest.raises(ReportError, match="different budget schedules"):
        gather([budgets])
    with pytest.raises(ReportError, match="--group-by: .* has no config key 'trainer.lr'"):
        gather([budgets / "strategy=random,seed=0"], "trainer.lr")


def test_partial_and_failed_runs_are_marked_not_fatal(tmp_path):
    root = sweep(tmp_path / "sweep", strategies=("random", "entropy"), seeds=(0, 1))
    make_run(root, "entropy", 2, [0.1, 0.2], rounds=2)  # killed after 2 of 3 rounds
    make_run(root, "random", 2, [], error="budget.initial: 10 images requested ...")
    make_run(root, "margin", 0, [0.1], rounds=2, stopped="pool exhausted: every image is labelled")
    run_set = gather([root])
    assert any("partial (2 of 3 rounds)" in w for w in run_set.warnings)
    assert any("failed: budget.initial" in w for w in run_set.warnings)
    by = {r.seed: r for r in run_set.groups["entropy"]}
    assert by[2].partial and not by[0].partial
    assert not run_set.groups["margin"][0].partial  # stopped cleanly is not partial
    comparison = compare(run_set)
    rows = {r["group"]: r for r in table_rows(comparison)}
    assert rows["entropy"]["status"] == "partial seeds: 2 (curves only)"
    # the unfinished seed is in the curve but not in the final estimate
    entropy = {s.group: s for s in comparison.summaries}["entropy"]
    assert entropy.final.n == 2 and entropy.final.mean == pytest.approx(0.385)
    assert comparison.curves["entropy"][1].y.n == 3 and comparison.curves["entropy"][2].y.n == 2
    _, _, files = build([root], tmp_path / "out")
    assert "failed: budget.initial" in files["html"].read_text()


def write_image(path: Path) -> None:
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(path)


def test_gallery_draws_predicted_boxes_or_says_none(tmp_path):
    root = tmp_path / "sweep"
    with_preds = make_run(root, "entropy", 0, [0.1, 0.2])
    without = make_run(root, "random", 0, [0.1, 0.2])
    for run in (with_preds, without):
        write_image(run / "img_a.png")
        selection = {"selected": [{"image_id": "a", "score": 0.75, "cost_s": 25.5}]}
        (run / "round_00" / "selection.json").write_text(json.dumps(selection))
        labelled = {"images": [{"alrun_id": "a", "file_name": str(run / "img_a.png")}]}
        (run / "round_01" / "labelled.json").write_text(json.dumps(labelled))
    np.savez(
        with_preds / "round_00" / "preds.npz",
        image_ids=np.array(["a"]),
        offsets=np.array([0, 2]),
        boxes=np.array([[8, 8, 40, 40], [0, 0, 5, 5]], np.float32),
        scores=np.array([0.9, 0.1], np.float32),  # the second is below the drawing threshold
        labels=np.array([0, 0]),
    )
    _, _, files = build([root], tmp_path / "out")
    page = files["html"].read_text()
    assert page.count("no predicted boxes stored for this run") == 1  # the random run
    assert "image score 0.75<br>1 of 2 boxes ≥ 0.3" in page
    thumbs = re.findall(r"<img alt='a' src='data:image/jpeg;base64,([^']+)'>", page)
    assert len(thumbs) == 2
    images = [np.asarray(Image.open(io.BytesIO(base64.b64decode(t)))) for t in thumbs]
    red = [((im[..., 0] > 200) & (im[..., 1] < 80)).sum() for im in images]
    # entropy (sorted first) has its 0.9 box drawn at 160/64 = 2.5x; random shows the bare image
    assert red[0] > 100 and red[1] == 0
    assert np.abs(images[0][60, 60].astype(int) - 90).max() <= 3  # outline only, inside untouched


@pytest.mark.parametrize(
    ("which", "seeds_shown"), [("all", [0, 1, 2]), ("first", [0]), ("none", [])]
)
def test_gallery_covers_every_seed_unless_asked_otherwise(tmp_path, which, seeds_shown):
    root = tmp_path / "sweep"
    for seed in (2, 0, 1):  # made out of order: the gallery sorts by seed
        run = make_run(root, "entropy", seed, [0.1, 0.2])
        write_image(run / f"img_{seed}.png")
        selection = {"selected": [{"image_id": f"s{seed}", "score": 0.5, "cost_s": 25.5}]}
        (run / "round_00" / "selection.json").write_text(json.dumps(selection))
        labelled = {"images": [{"alrun_id": f"s{seed}", "file_name": str(run / f"img_{seed}.png")}]}
        (run / "round_01" / "labelled.json").write_text(json.dumps(labelled))
    _, _, files = build([root], tmp_path / "out", gallery=which)
    page = files["html"].read_text()
    assert re.findall(r"<summary><b>entropy · seed (\d)</b></summary>", page) == [
        str(s) for s in seeds_shown
    ]
    assert re.findall(r"<img alt='s(\d)'", page) == [str(s) for s in seeds_shown]
    assert page.count("<details open>") == (1 if seeds_shown else 0)  # the first seed unfolded


def test_cli_error_is_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "alrun.report.cli", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert result.stderr.startswith("alrun-report: error: ")
    assert not (tmp_path / "report").exists()


def test_cli_prints_table(tmp_path, capsys):
    assert main([str(sweep(tmp_path / "s"))]) == 0
    out = capsys.readouterr().out
    assert "entropy" in out and "significant" in out
    assert (tmp_path / "s" / "report" / "report.html").is_file()


CHROMIUM = shutil.which("chromium") or (
    "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None
)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install chromium)")
def test_html_renders_in_headless_chromium(tmp_path):
    _, _, files = build([sweep(tmp_path / "s")], tmp_path / "out")
    shot = tmp_path / "page.png"
    with tempfile.TemporaryDirectory() as profile:
        flags = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            "--window-size=1400,1200",
            f"--screenshot={shot}",
        ]
        subprocess.run(
            [CHROMIUM, *flags, files["html"].as_uri()],
            capture_output=True,
            timeout=120,
            env={**os.environ, "HOME": profile},
        )
        dom = subprocess.run(
            [
                CHROMIUM,
                *[f for f in flags if not f.startswith("--screenshot")],
                "--dump-dom",
                files["html"].as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "HOME": profile},
        ).stdout
    assert "0.320 ± 0.050 (n=3)" in dom  # the browser parsed the table
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape[:2] == (1200, 1400)
    # the page is not blank: the plot lines and table text give many distinct colours
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50


@pytest.mark.parametrize(
    "damage,file",
    [
        (lambda run: (run / "state.json").write_text('{"last_compl'), "state.json"),
        (lambda run: (run / "state.json").write_bytes(b'{"stopped": "\xff"}'), "state.json"),
        (lambda run: (run / "results.csv").write_bytes(b"round,mAP\n0,\xff\xfe\n"), "results.csv"),
    ],
)
def test_a_damaged_run_is_left_out_with_a_warning_naming_the_file(tmp_path, damage, file):
    """Issue 25: one unreadable file does not stop the report; the rest still renders."""
    root = sweep(tmp_path / "sweep", strategies=("random", "entropy"), seeds=(0, 1))
    damaged = root / "strategy=entropy,seed=1"
    damage(damaged)
    run_set, comparison, files = build([root], tmp_path / "out")
    assert [r.seed for r in run_set.groups["entropy"]] == [0]
    assert any(w.startswith(f"{damaged / file}: unreadable") for w in run_set.warnings)
    assert f"{damaged / file}: unreadable" in files["html"].read_text()


def test_a_damaged_error_json_is_a_warning_naming_it(tmp_path):
    root = sweep(tmp_path / "sweep", strategies=("random", "entropy"), seeds=(0,))
    failed = make_run(root, "entropy", 1, [], error="x")
    (failed / "error.json").write_bytes(b'{"error": "\xff')
    run_set = gather([root])
    assert any(w.startswith(f"{failed / 'error.json'}: unreadable") for w in run_set.warnings)
    assert [r.seed for r in run_set.groups["entropy"]] == [0]


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_results_leave_the_run_out_naming_run_and_round(tmp_path, value):
    """Issue 25: NaN/inf never reach the curves or the statistics."""
    root = sweep(tmp_path / "sweep", strategies=("random", "entropy"), seeds=(0, 1, 2))
    bad = root / "strategy=entropy,seed=2"
    csv_path = bad / "results.csv"
    lines = csv_path.read_text().splitlines()
    cells = lines[2].split(",")
    cells[5] = value  # mAP of round 1
    csv_path.write_text("\n".join([*lines[:2], ",".join(cells), *lines[3:]]) + "\n")
    run_set = gather([root])
    assert f"{bad}: round 1: mAP is {value}; run left out of the report" in run_set.warnings
    comparison = compare(run_set)
    entropy = {s.group: s for s in comparison.summaries}["entropy"]
    assert entropy.final.n == 2 and np.isfinite(entropy.final.mean)
    assert main([str(root), "--out", str(tmp_path / "out")]) == 0


def test_cli_on_a_damaged_run_prints_a_warning_not_a_traceback(tmp_path):
    root = sweep(tmp_path / "sweep", strategies=("random", "entropy"), seeds=(0, 1))
    (root / "strategy=entropy,seed=1" / "state.json").write_text("{")
    result = subprocess.run(
        [sys.executable, "-m", "alrun.report.cli", str(root)],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert "state.json: unreadable" in result.stdout


def _red_pixels(png: bytes) -> int:
    """Pixels of the curves' collapse marker colour (#e00000; the palette's red is #d62728)."""
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    return int(((pixels[..., 0] > 210) & (pixels[..., 1] < 20) & (pixels[..., 2] < 20)).sum())


def test_collapsed_and_floor_rounds_are_shown_and_their_comparisons_not_called_significant(
    tmp_path,
):
    root = tmp_path / "sweep"
    for seed in (0, 1, 2):
        # random: healthy; entropy: collapsed in round 0 on every seed (the loop's flag); ppal:
        # seed 2 stays at the floor (mAP50 0.02 < 0.05) in every round without being flagged
        make_run(root, "random", seed, [0.1, 0.2, FINALS["random"][seed]], collapsed=[0, 0, 0])
        make_run(
            root,
            "entropy",
            seed,
            [0.1, 0.25, FINALS["entropy"][seed]],  # paired diffs 0.06 0.07 0.05: "significant"
            map50=[0.005, 0.4, 0.5],
            collapsed=[1, 0, 0],
        )
        map50 = [0.01, 0.02, 0.02] if seed == 2 else [0.3, 0.4, 0.5]
        make_run(root, "ppal", seed, [0.1, 0.2, FINALS["margin"][seed]], map50=map50)
    run_set, comparison, files = build([root], tmp_path / "out")
    rows = {r["group"]: r for r in table_rows(comparison)}
    versus = "paired diff vs random (final mAP)"
    assert rows["entropy"][versus] == (
        "+0.060 ± 0.025: not comparable: collapsed or floor-level models (entropy 3 of 3 seeds)"
    )
    assert "significant" not in rows["entropy"][versus]
    assert rows["ppal"][versus].endswith(
        "not comparable: collapsed or floor-level models (ppal 1 of 3 seeds)"
    )
    assert rows["random"]["model health"] == "ok"
    assert rows["ppal"]["model health"] == (
        "collapsed or floor-level (mAP50 < 0.05) rounds in 1 of 3 seeds (2)"
    )
    health = {(r["group"], r["seed"]): r for r in csv_rows(files["health"])}
    assert len(health) == 9
    assert health[("entropy", "0")]["collapsed rounds (loop's flag)"] == "0"
    assert health[("entropy", "0")]["floor rounds (test mAP50 < 0.05)"] == "0"
    assert health[("ppal", "2")]["floor rounds (test mAP50 < 0.05)"] == "all"
    assert health[("ppal", "2")]["collapsed rounds (loop's flag)"] == "–"
    assert health[("ppal", "2")]["best mAP50"] == "0.020"
    assert health[("random", "1")]["verdict"] == "ok"
    curves = {(r["group"], r["round"]): r for r in csv_rows(files["curves"])}
    assert curves[("entropy", "0")]["flagged_seeds"] == "3"
    assert curves[("entropy", "1")]["flagged_seeds"] == "0"
    assert curves[("ppal", "2")]["flagged_seeds"] == "1"
    summary = files["summary"].read_text()
    assert "not comparable" in summary and "significant" not in summary
    page = files["html"].read_text()
    assert "4 of 9 runs had collapsed or floor-level models" in page
    assert "Model health (per group and seed)" in page
    # the curves mark the flagged rounds; a sweep without any has no marker colour at all
    assert _red_pixels(files["png"].read_bytes()) > 50
    _, _, clean = build([sweep(tmp_path / "clean")], tmp_path / "clean_out")
    assert _red_pixels(clean["png"].read_bytes()) == 0
    assert "collapsed or floor-level models" not in clean["html"].read_text()
    # a stricter floor is an option of alrun-report (every group's round 0 has mAP50 <= 0.3)
    strict = compare(run_set, floor_map50=0.35)
    assert {s.group: len(s.unhealthy) for s in strict.summaries} == {
        "entropy": 3,
        "ppal": 3,
        "random": 3,
    }


def csv_rows(path: Path) -> list[dict[str, str]]:
    import csv

    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_two_seeds_are_too_wide_to_compare_and_bands_stay_in_0_1(tmp_path):
    comparison = compare(gather([sweep(tmp_path / "two", seeds=(0, 1))]))
    rows = {r["group"]: r for r in table_rows(comparison)}
    assert rows["entropy"]["paired diff vs random (final mAP)"] == (
        "+0.065 ± 0.064: 2 seeds: interval too wide to compare (t = 12.7)"
    )
    assert rows["random"]["final mAP (95% CI)"] == (
        "0.320 ± 0.254 (n=2: interval too wide to compare)"
    )
    # three seeds far apart: the t interval (0.4 ± 1.2) is clipped to mAP's range [0, 1]
    wide = tmp_path / "wide"
    for seed, final in enumerate((0.0, 0.3, 0.9)):
        make_run(wide, "random", seed, [0.05, 0.1, final])
    _, comparison, files = build([wide], tmp_path / "out")
    final = comparison.curves["random"][2].y
    assert final.low < -0.5 and final.high > 1.5
    last = csv_rows(files["curves"])[-1]
    assert float(last["ci95_low"]) == 0.0 and float(last["ci95_high"]) == 1.0
    page = files["html"].read_text()
    assert "With 2 seeds t = 12.7" in page


def test_report_help_says_95_percent():
    result = subprocess.run(
        [sys.executable, "-m", "alrun.report.cli", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0
    assert "95 % CI" in result.stdout and "%%" not in result.stdout
    assert "--floor-map50" in result.stdout


def test_a_damaged_round_file_is_left_out_of_the_error_table_with_a_warning(tmp_path, capsys):
    """metrics.json / selection.json only decorate the report: one unreadable file is named on
    stderr and its cells stay empty; the other seeds' numbers still make the table."""
    root = sweep(tmp_path / "sweep", strategies=("random", "entropy"), seeds=(0, 1))
    damaged = root / "strategy=entropy,seed=1" / "round_01" / "metrics.json"
    damaged.write_bytes(b'{"fp": \xff')
    (damaged.parent / "selection.json").write_text("[not json")
    _, _, files = build([root], tmp_path / "out")
    assert f"{damaged}: unreadable (UnicodeDecodeError), left out" in capsys.readouterr().err
    rows = [line.split(",") for line in files["errors"].read_text().splitlines()]
    header = rows[0]
    entropy_round_1 = next(r for r in rows if r[0] == "entropy" and r[1] == "1")
    assert entropy_round_1[header.index("seeds")] == "1"  # seed 0 only
    assert entropy_round_1[header.index("fp")] == "4.0"


def test_runs_group_by_the_config_group_option_they_were_composed_with(tmp_path):
    """Two presets of one regime class (weak_point, weak_point_soft) differ only in the option
    Hydra composed: ``choices.supervision`` tells them apart; several keys combine."""
    regimes = {
        "full": [0.1, 0.2, 0.30],
        "weak_point": [0.1, 0.25, 0.35],
        "weak_point_soft": [0.1, 0.2, 0.4],
    }
    for regime, maps in regimes.items():
        for seed in (0, 1):
            run = make_run(tmp_path / regime, "random", seed, [m + 0.01 * seed for m in maps])
            hydra = {
                "hydra": {"runtime": {"choices": {"supervision": regime, "strategy": "random"}}}
            }
            (run / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(hydra))
    run_set = gather([tmp_path], "choices.supervision")
    assert sorted({r.group for r in run_set.runs}) == sorted(regimes)
    finals = {r.group: r.rows[-1]["mAP"] for r in run_set.runs if r.seed == 0}
    assert finals == {k: v[-1] for k, v in regimes.items()}
    combined = gather([tmp_path], "choices.supervision,strategy.name")
    assert {r.group for r in combined.runs} == {f"{k}/random" for k in regimes}
    with pytest.raises(ReportError, match="no config key 'choices.oracle'"):
        gather([tmp_path], "choices.oracle")


def test_the_name_a_run_resolved_at_start_groups_it(tmp_path):
    """``strategy.name`` of a composed strategy depends on the run's command line, which only
    the run could read: the report takes it from the run's config.json, not .hydra's yaml."""
    for seed in (0, 1):
        plain = make_run(tmp_path, "entropy", seed, [0.1, 0.2, 0.3])
        composed = make_run(tmp_path, "composed", seed, [0.1, 0.2, 0.4])
        for run in (plain, composed):
            config = yaml.safe_load((run / ".hydra" / "config.yaml").read_text())
            config["strategy"]["name"] = "${alrun_strategy_name:entropy}"
            (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
        (composed / "config.json").write_text(
            json.dumps({"config": {"strategy": {"name": "entropy+selector=kcenter"}}})
        )
    groups = gather([tmp_path]).groups
    assert sorted(groups) == ["entropy", "entropy+selector=kcenter"]
    assert [r.seed for r in groups["entropy+selector=kcenter"]] == [0, 1]
