"""Shared test set-up: the environment every test inherits, and the tiny model."""

import os

# Every test runs offline on CPU (README: environment). setdefault: a caller may already set them.
for _key, _value in {
    "DS_ACCELERATOR": "cpu",
    "RAY_AUTH_MODE": "disabled",
    "WANDB_MODE": "offline",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_ALLOW_INSECURE_SERIALIZATION": "1",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(_key, _value)


import pytest  # noqa: E402  (the fixture section below was appended after the environment set-up)


@pytest.fixture(scope="session")
def tiny_model_path() -> str:
    """The warmed-up tiny model folder (`resolve_model("tiny")`), built once per machine."""
    from larpo_ray.models import resolve_model

    return resolve_model("tiny")
