"""The JSON record every benchmark writes: command, commit, date, machine, then the script's own figures."""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def machine() -> dict:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    # Thread-pool settings change the figures (OMP_WAIT_POLICY=active: +25% decode at 2 threads here).
    env = {k: os.environ[k] for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS") if k in os.environ}
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "load_avg_at_start": os.getloadavg(), "env": env}


def write_record(path: Path, **figures) -> None:
    """Write `figures` under the run's command, git commit, date and machine to `path` (JSON)."""
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=HERE,
                            check=False).stdout.strip()
    # Uncommitted edits to tracked files mean the commit alone does not say what ran.
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                text=True, cwd=HERE, check=False).stdout.strip())
    record = {"command": shlex.join(sys.argv), "commit": commit, "dirty": dirty,
              "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine(), **figures}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")
