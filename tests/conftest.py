"""Shared test set-up: the environment every test inherits, and the tiny model."""

import pytest

from larpo_ray.cpu_env import apply_cpu_env

apply_cpu_env()  # every test runs offline on CPU (cpu-env.mk); a caller's values win


@pytest.fixture(scope="session")
def tiny_model_path() -> str:
    """The warmed-up tiny model folder (`resolve_model("tiny")`), built once per machine."""
    from larpo_ray.models import resolve_model

    return resolve_model("tiny")
