# `make demo` trains the main job; `make test` runs the tests. Each creates .venv and installs what is missing.
PYTHON ?= python3
VENV ?= .venv
VENV_FLAGS ?=
PY := $(VENV)/bin/python
# A CPU machine has this wheel on local disk; a machine with a CUDA torch already can pass
# VENV_FLAGS=--system-site-packages so the existing torch (>= 2.11) is used instead.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.herd-installed
PIP := $(PY) -m pip install --disable-pip-version-check -q

.PHONY: install demo align-demo recipe-demo test test-all clean-demo gpu-wheels

# the editable install lists the top-level packages it maps: a new one (a new */__init__.py) reinstalls
$(STAMP): pyproject.toml setup.py $(wildcard */__init__.py)
	test -x $(PY) || $(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(PY) -c "import torch, sys; sys.exit(tuple(map(int, torch.__version__.split('.')[:2])) < (2, 11))" 2>/dev/null \
		|| $(PIP) "$(TORCH_SPEC)"
	$(PIP) setuptools wheel
	$(PIP) --no-build-isolation -e ".[test]"
	# ships the real Llama 3 tokenizer file; its own dependencies are not needed to read it
	$(PIP) --no-deps llama-models
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m launch.demo

# `make scaling-demo`: an IsoFLOP sweep (4 budgets x 4-5 sizes) on CPU on the demo corpus, fitted; results to
# benchmarks/results/scaling_demo* (docs/scaling.md). Finished runs are kept: rm -rf runs/scaling-demo to redo it.
.PHONY: scaling-demo
scaling-demo: $(STAMP)
	$(PY) -m scaling.demo

# `make curate-demo`: herd curate's demo pipeline on Debian's documentation here (configs/curate/demo.yaml,
# docs/data_curation.md), local executor, then its report. Finished passes are kept: rm -rf runs/curate-demo to redo.
.PHONY: curate-demo
curate-demo: $(STAMP)
	$(PY) -m launch curate configs/curate/demo.yaml

align-demo: $(STAMP)
	$(PY) -m launch.align_demo

recipe-demo: $(STAMP)
	$(PY) -m launch.recipe_demo

test: $(STAMP)
	$(PY) -m pytest -q tests

test-all: $(STAMP)
	$(PY) -m pytest -q -m "" tests

clean-demo:
	rm -rf data/stdlib* data/licenses* data/align runs/demo runs/demo.* runs/align-demo runs/recipe-demo

# Pure-Python wheels the lent GPU machine lacks (it has no network); carried there as wheels/.
# wheels/peers/: benchmarks/peers.py's peers and what they import at run time that the machine's image lacks
# (Python 3.12, torch 2.11, transformers 5.x, triton there; check.sh installs them into a folder of their own).
PEER_WHEELS := liger-kernel==0.8.5 torchtitan==0.3.0 spmd-types==0.2.3 torch-checkpointing==0.1.1 tyro==1.0.17 \
	docstring-parser==0.18.0 typeguard==4.6.1 torchdata==0.11.0 datasets==4.7.0 dill==0.4.0 multiprocess==0.70.18 \
	torchao==0.18.0 megatron-core==0.19.2
GPU_PLATFORMS := --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
	--platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
gpu-wheels: $(STAMP)
	$(PY) -m pip download --disable-pip-version-check -q --no-deps -d wheels omegaconf llama-models
	$(PY) -m pip download --disable-pip-version-check -q --no-deps --only-binary=:all: --python-version 3.12 \
		--platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d wheels tiktoken ninja
	$(PY) -m pip download --disable-pip-version-check -q --no-deps --only-binary=:all: $(GPU_PLATFORMS) \
		-d wheels/peers $(PEER_WHEELS)
