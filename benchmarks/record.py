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


def _process_age_s() -> float | None:
    """Seconds since this process started (Linux /proc), or None elsewhere."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        return float(Path("/proc/uptime").read_text().split()[0]) - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


# The machine's load when this module was imported: a script that imports it at the top records the load it
# started under; one that imports it only to write (after the work) records its own load too, labelled so.
_LOAD_AT_IMPORT = os.getloadavg()
_AGE_AT_IMPORT = _process_age_s()


def machine() -> dict:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    # Thread-pool settings change the figures (OMP_WAIT_POLICY=active: +25% decode at 2 threads here).
    env = {k: os.environ[k] for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS") if k in os.environ}
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            _load_key(): _LOAD_AT_IMPORT, "env": env}


def _load_key() -> str:
    return "load_avg_at_start" if _AGE_AT_IMPORT is not None and _AGE_AT_IMPORT < 60 else "load_avg_at_end"


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
