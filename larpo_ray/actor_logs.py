"""Each actor's output in a file of its own: RUN_DIR/logs/<role>.log (no Ray here).

`redirect_output(path)` points this process's stdout and stderr (file descriptors 1 and 2, so
also what C++ libraries and child processes such as vLLM's engine core print) at `path`,
appended to across restarts. With `tee=True` everything also still goes to the original stdout,
which Ray streams to the driver's console (`logging.console = all`, `--verbose`).
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path


def log_path(log_dir: str | Path, role: str, index: int) -> Path:
    """RUN_DIR/logs/generator-0.log, reward-0.log, learner-rank-1.log, ..."""
    return Path(log_dir) / f"{role}-{index}.log"


def redirect_output(path: str | Path, tee: bool = False) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    log_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    if not tee:
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        os.close(log_fd)
        return
    original = os.dup(1)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 1)
    os.dup2(write_end, 2)
    os.close(write_end)

    def pump() -> None:
        while chunk := os.read(read_end, 65536):
            os.write(log_fd, chunk)
            os.write(original, chunk)

    threading.Thread(target=pump, name="log-tee", daemon=True).start()
