"""Benchmark: greedy k-center selecting k points from N of dimension d (not a test).

Each (N, data, method) runs in a fresh subprocess so its peak resident memory (``ru_maxrss``)
is its own; ``extra`` is that peak minus the process's resident size before the feature matrix
was allocated, so it counts the matrix itself plus everything the selection adds
(goal: <= 2 x the matrix). Python's ``tracemalloc`` does not see torch's allocations, hence
``ru_maxrss``.

Methods:
  batched   alrun.acquisition.diversity.k_center_greedy (exact greedy, O(N d) memory)
  naive     one pass over the matrix per pick (O(N d) memory, k passes); above --naive-max-n
            points it is timed on 1,000 picks and extrapolated linearly (marked ~)
  matrix    the textbook version with the N x N distance matrix (only where it fits:
            --matrix-max-n)

    nice -n 15 python scripts/bench_select.py                  # N = 1e4, 1e5, 1e6, k = 10,000
    python scripts/bench_select.py --sizes 10000 --k 1000      # quick
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's alrun


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def make_features(n: int, d: int, kind: str, seed: int):
    """(n, d) float32 built in chunks (no full-size temporaries). ``clustered``: 1,000 Gaussian
    blobs of std 1 around centres of std 10 (so blobs are far apart)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.empty((n, d), dtype=torch.float32)
    centres = torch.randn((1000, d), generator=g) * 10.0 if kind == "clustered" else None
    for start in range(0, n, 65536):
        stop = min(start + 65536, n)
        block = torch.randn((stop - start, d), generator=g)
        if centres is not None:
            block += centres[torch.randint(0, 1000, (stop - start,), generator=g)]
        x[start:stop] = block
    return x


def covering_radius(x, start, picked) -> float:
    """max over points of the distance to the nearest centre (labelled set + picks), in float64
    (after the peak memory was read): the quantity greedy k-center minimises."""
    import torch

    centres = torch.cat([start, x[picked]]).double()
    worst = 0.0
    for s in range(0, len(x), 2048):
        d = torch.cdist(x[s : s + 2048].double(), centres).amin(dim=1)
        worst = max(worst, float(d.max()))
    return worst


def run_one(n: int, d: int, k: int, kind: str, method: str, naive_picks: int, threads: int):
    import torch

    torch.set_num_threads(threads)
    from alrun.acquisition.diversity import k_center_greedy, naive_k_center_greedy

    base = rss_mb()
    x = make_features(n, d, kind, seed=0)
    start = x[:10].clone() + 0.5  # a small "labelled set" near the first points
    feature_mb = x.numel() * 4 / 2**20
    t0 = time.perf_counter()
    picks = min(k, n)
    extrapolated = False
    if method == "batched":
        picked = k_center_greedy(x, picks, start)
    elif method == "naive":
        timed = min(picks, naive_picks)
        picked = naive_k_center_greedy(x, timed, start)
        extrapolated = timed < picks
    elif method == "matrix":
        dist = torch.cdist(x, x)  # N x N
        mind = torch.cdist(x, start).min(dim=1).values
        picked = []
        for _ in range(picks):
            j = int(torch.argmax(mind))
            picked.append(j)
            mind = torch.minimum(mind, dist[:, j])
            mind[j] = -1
        del dist
    else:
        raise SystemExit(f"unknown method {method}")
    seconds = time.perf_counter() - t0
    if extrapolated:
        seconds *= picks / len(picked)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    radius = covering_radius(x, start, picked) if n <= 10_000 and not extrapolated else None
    return {
        "radius": radius,
        "n": n,
        "kind": kind,
        "method": method,
        "k": picks,
        "seconds": seconds,
        "extrapolated": extrapolated,
        "feature_mb": feature_mb,
        "extra_mb": peak_mb - base,
        "picks_sha1": hashlib.sha1(json.dumps(picked).encode()).hexdigest()[:12],
        "picks": picked if n <= 10_000 else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--d", type=int, default=256)
    parser.add_argument("--k", type=int, default=10_000)
    parser.add_argument("--kinds", nargs="+", default=["random", "clustered"])
    parser.add_argument("--methods", nargs="+", default=["batched", "naive", "matrix"])
    parser.add_argument("--matrix-max-n", type=int, default=20_000)
    parser.add_argument("--naive-picks", type=int, default=10_000, help="picks timed")
    parser.add_argument("--naive-max-n", type=int, default=10_000, help="above: 1,000 picks timed")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        n, kind, method, picks = args.one.split(",")
        print(json.dumps(run_one(int(n), args.d, args.k, kind, method, int(picks), args.threads)))
        return
    rows = []
    for n in args.sizes:
        for kind in args.kinds:
            for method in args.methods:
                if method == "matrix" and n > args.matrix_max_n:
                    continue
                picks = args.naive_picks if n <= args.naive_max_n else 1000
                cmd = [
                    sys.executable,
                    __file__,
                    "--one",
                    f"{n},{kind},{method},{picks}",
                    "--d",
                    str(args.d),
                    "--k",
                    str(args.k),
                    "--threads",
                    str(args.threads),
                ]
                out = subprocess.run(cmd, capture_output=True, text=True, check=False)
                if out.returncode != 0:
                    print(f"N={n} {kind} {method}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
                    continue
                row = json.loads(out.stdout.strip().splitlines()[-1])
                rows.append(row)
                print(_line(row), flush=True)
    print()
    print(f"k-center greedy, k = {args.k}, d = {args.d}, {args.threads} threads")
    print("| N | data | method | time (s) | matrix (MB) | peak extra (MB) | extra / matrix |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        approx = "~" if row["extrapolated"] else ""
        print(
            f"| {row['n']:,} | {row['kind']} | {row['method']} | {approx}{row['seconds']:.1f} | "
            f"{row['feature_mb']:.0f} | {row['extra_mb']:.0f} | "
            f"{row['extra_mb'] / row['feature_mb']:.2f} |"
        )
    # the batched and naive greedy must agree where both ran fully
    by_key = {(r["n"], r["kind"], r["method"]): r for r in rows}
    for (n, kind, method), row in by_key.items():
        other = by_key.get((n, kind, "naive"))
        if method == "batched" and other and not other["extrapolated"]:
            same = row["picks_sha1"] == other["picks_sha1"]
            diff = next(
                (i for i, (p, q) in enumerate(zip(row["picks"], other["picks"])) if p != q), None
            )
            print(
                f"N={n:,} {kind}: batched picks == naive picks (all {row['k']:,}): {same}"
                + ("" if same else f" (first difference at pick {diff})")
                + f"; covering radius batched {row['radius']:.6f}, naive {other['radius']:.6f}"
            )


def _line(row: dict) -> str:
    approx = "~" if row["extrapolated"] else ""
    return (
        f"N={row['n']:>9,} {row['kind']:9} {row['method']:7} {approx}{row['seconds']:8.1f} s  "
        f"extra {row['extra_mb']:7.0f} MB (matrix {row['feature_mb']:.0f} MB)"
    )


if __name__ == "__main__":
    main()
