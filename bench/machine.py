"""What a benchmark's numbers depend on: the machine, its load when the run began, the commit."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from pathlib import Path

from harness.processes import REPO


def command_output(command: list[str]) -> str:
    """The first line a version command prints (on stdout or stderr)."""
    try:
        done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=20, cwd=REPO)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"unavailable ({error})"
    lines = (done.stdout + done.stderr).strip().splitlines()
    return lines[0].strip() if lines else "unavailable"


def describe_machine() -> dict:
    models = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
              if line.startswith("model name")]
    return {
        "nproc": os.cpu_count(),
        "cpu_model": models[0] if models else platform.processor(),
        "load_average_at_start": [round(value, 2) for value in os.getloadavg()],
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "git_commit": command_output(["git", "rev-parse", "--short", "HEAD"]),
        "python": platform.python_version(),
    }
