# sparse-llava: `make demo` installs and runs the built-in example, `make test` installs and runs the tests.
PYTHON ?= python3
VENV ?= .venv
# The torch requirement used when torch is not installed yet (e.g. `make test TORCH_SPEC=torch==2.13.0`).
TORCH_SPEC ?= torch
# Where torch comes from, e.g. https://download.pytorch.org/whl/cpu for the CPU build (empty: the default index).
TORCH_INDEX_URL ?=
# The transformers requirement installed with the package: the latest release pyproject.toml allows by default,
# e.g. `make test VENV=.venv-457 TRANSFORMERS_SPEC="transformers==4.57.*"` for the 4.57 line.
TRANSFORMERS_SPEC ?= transformers
PY := $(VENV)/bin/python

.PHONY: install demo test drift lint bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || \
		$(PY) -m pip install --quiet $(if $(TORCH_INDEX_URL),--index-url "$(TORCH_INDEX_URL)") "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev]" "$(TRANSFORMERS_SPEC)"
	touch $@

demo: install
	HF_HUB_OFFLINE=1 $(PY) examples/demo.py

test: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

# What must hold on every supported transformers release (.ci/run runs it on the floor and a middle release).
drift: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q tests/test_drift.py tests/test_transformers_hooks.py

lint: install
	$(PY) -m ruff check .

bench: install
	$(PY) -m pip install --quiet -e ".[plot]"
	HF_HUB_OFFLINE=1 $(PY) benchmarks/run.py --json benchmarks/latest.json --plot benchmarks/latest.png

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
