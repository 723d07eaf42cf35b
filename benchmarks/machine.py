"""What the CPU benchmarks share: the machine description, the default result path, the
environment the project's runs expect (Makefile), and a plain-text table.

Imported by `phase_breakdown.py`, `generation.py`, `learner.py` and `weight_sync.py` (run as
scripts, so this folder is on `sys.path`). Imports nothing heavy.
"""

from __future__ import annotations

import json
import os
import platform
import re
import socket
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def cpu_environment() -> None:
    """Set the CPU run environment of cpu-env.mk (before torch, DeepSpeed or vLLM are imported);
    a caller's values win."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from larpo_ray.cpu_env import apply_cpu_env

    apply_cpu_env()


def cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown"
    found = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    return found.group(1).strip() if found else "unknown"


def describe() -> dict:
    """CPU model, cores, torch threads, load average and library versions of this run."""
    import torch

    info = {
        "host": socket.gethostname(),
        "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda": torch.cuda.is_available(),
        "load_average_1m_at_start": os.getloadavg()[0],
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    try:
        info["total_memory_gb"] = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    except (ValueError, OSError):
        pass
    return info


def machine_tag() -> str:
    """A short name for result files: `cpu<cores>` here, the GPU name with CUDA."""
    import torch

    if torch.cuda.is_available():
        return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")
    return f"cpu{os.cpu_count()}"


def default_out(name: str) -> Path:
    return RESULTS / f"{name}_{machine_tag()}_{time.strftime('%Y%m%d')}.json"


def save(result: dict, out: Path | None, name: str) -> Path:
    path = Path(out) if out else default_out(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {path}")
    return path


def table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """rows as a text table; columns are (header, key, format such as '{:.1f}')."""
    cells = [[h for h, _, _ in columns]]
    for row in rows:
        cells.append(
            [
                fmt.format(row[key]) if isinstance(row.get(key), (int, float)) else str(row.get(key, "-"))
                for _, key, fmt in columns
            ]
        )
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells)
