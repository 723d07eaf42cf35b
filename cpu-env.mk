# The environment every CPU run, test and benchmark wants (docs/cpu.md); `?=`: a value you export
# first wins. The Makefile includes this file; tests/conftest.py and benchmarks/machine.py read it
# with larpo_ray.cpu_env, so this is the one list.
DS_ACCELERATOR ?= cpu
RAY_AUTH_MODE ?= disabled
WANDB_MODE ?= offline
HF_HUB_OFFLINE ?= 1
HF_DATASETS_OFFLINE ?= 1
VLLM_CPU_KVCACHE_SPACE ?= 1
VLLM_ALLOW_INSECURE_SERIALIZATION ?= 1
TOKENIZERS_PARALLELISM ?= false
