# Two commands do all set-up on a fresh machine: `make demo` and `make test` (see README, Set-up).
#
# One variable picks the torch build:
#   make test                                                   # whatever `pip install $(TORCH)` resolves
#   make test TORCH_INDEX=https://download.pytorch.org/whl/cpu  # the CPU-only build (no CUDA libraries)
# On Linux, pip's default index serves the CUDA build (a ~530 MB wheel plus the nvidia-* packages),
# right for a GPU machine; where a CPU wheel is preconfigured (pip find-links), that one is taken.
# Changing TORCH or TORCH_INDEX later re-runs the install.
PY          ?= python3
VENV        ?= .venv
TORCH       ?= torch==2.13.0
TORCH_INDEX ?=
BIN         := $(VENV)/bin
STAMP       := $(VENV)/.installed
SPEC        := $(VENV)/.torch-spec
TORCH_FROM  := $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
# one torch thread: on a small model and few cores, torch's default (one thread per core) is
# several times slower and unstable under load (README, Threads); the library never sets it.
export OMP_NUM_THREADS := 1
export MKL_NUM_THREADS := 1
export HF_HUB_OFFLINE := 1
export MPLBACKEND := Agg

.PHONY: install test demo bench clean test-deepinv FORCE

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# rewritten only when the torch choice changes, so the install re-runs exactly then
$(SPEC): FORCE | $(BIN)/python
	@echo '$(TORCH) $(TORCH_INDEX)' | cmp -s - $@ || echo '$(TORCH) $(TORCH_INDEX)' > $@

# torch first, so `torch>=2.3` in pyproject is already satisfied when the package installs.
# No -q: the torch download can take minutes, and pip shows its progress.
$(STAMP): $(SPEC) pyproject.toml | $(BIN)/python
	@echo ">>> [1/2] $(TORCH) from $(if $(TORCH_INDEX),$(TORCH_INDEX),pip's configured index (CUDA build on Linux unless a CPU wheel is preconfigured; for CPU only: make $(or $(MAKECMDGOALS),install) TORCH_INDEX=https://download.pytorch.org/whl/cpu))"
	$(BIN)/python -m pip install $(TORCH_FROM) "$(TORCH)"
	@echo ">>> [2/2] adjointflow (editable) with the test and demo extras"
	$(BIN)/python -m pip install -e ".[test]"
	@$(BIN)/python -c "import torch; b = 'CUDA ' + torch.version.cuda if torch.version.cuda else 'CPU only'; print(f'>>> installed torch {torch.__version__} ({b}; CUDA device available: {torch.cuda.is_available()}) in $(VENV)')"
	touch $(STAMP)

install: $(STAMP)

# DEEPINV=1 (default): `make test` also runs the deepinv equivalence tests in their own environment
# (test-deepinv below; ~1-3 min, downloads deepinv and torchvision once); DEEPINV=0 skips them.
DEEPINV ?= 1

test: $(STAMP)
	$(BIN)/python -m pytest -q
	$(if $(filter 1,$(DEEPINV)),@$(MAKE) --no-print-directory test-deepinv)

demo: $(STAMP)
	$(BIN)/python -m adjointflow demo

bench: $(STAMP)
	$(BIN)/python -m pytest benchmarks --benchmark-only -p no:cacheprovider -o testpaths=benchmarks

# Optional: deepinv operators (tests/test_deepinv_operators.py) in their own environment. deepinv needs
# torchvision, whose PyPI build is a CUDA one: pinned to the installed torch it does not replace it, but its
# C++ ops cannot load over a CPU torch, which breaks transformers' imports in the same environment.
DEEPINV_VENV ?= .venv-deepinv
test-deepinv:
	test -x $(DEEPINV_VENV)/bin/python || $(PY) -m venv $(DEEPINV_VENV)
	@echo ">>> deepinv equivalence tests in $(DEEPINV_VENV) (DEEPINV=0 skips them)"
	$(DEEPINV_VENV)/bin/python -m pip install -q $(TORCH_FROM) "$(TORCH)"
	$(DEEPINV_VENV)/bin/python -c "import torch; print('torch==' + torch.__version__)" > $(DEEPINV_VENV)/constraints.txt
	$(DEEPINV_VENV)/bin/python -m pip install -q -c $(DEEPINV_VENV)/constraints.txt -e . pytest "deepinv==0.5.0" torchvision
	$(DEEPINV_VENV)/bin/python -m pytest -q tests/test_deepinv_operators.py

clean:
	rm -rf $(VENV) $(DEEPINV_VENV) demo_out
