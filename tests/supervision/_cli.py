"""Run the alrun CLI in a subprocess and return (exit code, the `alrun: error:` lines)."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.helpers import REPO


def alrun_errors(*overrides: str) -> tuple[int, list[str]]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "alrun.cli", *overrides],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    return proc.returncode, [ln for ln in proc.stderr.splitlines() if ln.startswith("alrun:")]
