# Fresh machine: `make demo` or `make test` builds .venv and installs everything first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# CPU build on this machine; GPU users install megamu into their own environment instead.
TORCH_SPEC ?= torch==2.13.0
DEMO_DIR ?= runs/demo
# DeepSpeed's CPU ops are compiled against this venv's torch, so they live in the venv, not in a
# cache shared with other environments; a build killed midway leaves a lock there that would make
# every later load wait forever, hence the removal before the (bounded) build below.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/$(VENV)/torch_extensions

.PHONY: demo test bench

$(BIN)/.installed: setup.py
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade setuptools wheel
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	# DeepSpeed builds from source: no CUDA ops here (they JIT on GPU machines), and the
	# build must see the torch above rather than pull a CUDA build into an isolated env.
	DS_BUILD_OPS=0 $(BIN)/pip install -q --no-build-isolation "deepspeed>=0.19.3,<0.20"
	$(BIN)/pip install -q -e ".[dev]"
	# On CPU, DeepSpeed's communication backend JIT-compiles a shared-memory op the first time a
	# process group starts (minutes on 2 cores); build it once here rather than inside a test.
	rm -f "$$TORCH_EXTENSIONS_DIR"/*/lock
	timeout 1200 $(BIN)/python -c "from deepspeed.accelerator import get_accelerator as a; b = a().create_op_builder('ShareMemCommBuilder'); b and b.load()"
	touch $@

# benchmarks/bench_mfu.py compares with HF transformers: setup.py's `bench` extra.
$(BIN)/.bench-installed: $(BIN)/.installed
	$(BIN)/pip install -q -e ".[bench]"
	touch $@

demo: $(BIN)/.installed
	$(BIN)/python -m megamu.demo --out $(DEMO_DIR)

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q tests

# A smoke run of every benchmark at its smallest size (benchmarks/run_all.py).
bench: $(BIN)/.bench-installed
	$(BIN)/python benchmarks/run_all.py
