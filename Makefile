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

.PHONY: install install-extras demo test gpu-check drift lint bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || \
		$(PY) -m pip install --quiet $(if $(TORCH_INDEX_URL),--index-url "$(TORCH_INDEX_URL)") "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev]" "$(TRANSFORMERS_SPEC)"
	touch $@

# The optional extras (lmms-eval plugin and accuracy metrics, `sparse-llava serve`, plots), keeping the installed torch:
# lmms-eval's requirements would otherwise be free to replace it. lmms-eval requires torchvision; PyPI's torchvision
# wheels are built against the CUDA torch, fail to load next to a CPU-only torch build, and transformers imports
# torchvision whenever it is installed, so a torchvision that cannot be imported is removed again.
install-extras: install
	$(PY) -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > $(VENV)/torch-constraint.txt
	$(PY) -m pip install --quiet -c $(VENV)/torch-constraint.txt -e ".[dev,eval,serve,plot]" "$(TRANSFORMERS_SPEC)"
	$(PY) -c "import torchvision" 2>/dev/null || $(PY) -m pip uninstall --quiet -y torchvision

demo: install
	HF_HUB_OFFLINE=1 $(PY) examples/demo.py

test: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

# The CUDA side in one command (benchmarks/gpu_check.py): the device tests on CUDA, no host synchronisation in decode
# steps, flash-attention if installed, compiled generate(), a short bf16 benchmark. Without CUDA it skips and exits 0.
gpu-check: install
	HF_HUB_OFFLINE=1 $(PY) benchmarks/gpu_check.py

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
