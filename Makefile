# The two entry points of the README: `make demo` and `make test`. Each sets up everything
# it needs on a fresh machine (a virtual environment with pinned torch) and is idempotent.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.stamp-installed

.PHONY: demo test lint typecheck unit docs bench gpu wheel

# TransformerLens for its tests, without the training stack its full requirements bring
# (wandb, sentencepiece, ...): the set below is what importing TransformerBridge needs.
LENS := transformer-lens==4.3.0 jaxtyping==0.3.11 datasets==5.2.0 multiprocess==0.70.19 \
	pandas==3.1.1 pyarrow==26.0.1 dill==0.4.1 xxhash==4.1.0

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	$(BIN)/python -m pip install -q -c constraints.txt --no-deps $(LENS)
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m hookfn.demo

test: lint typecheck unit docs bench gpu wheel

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check hookfn

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet --site-dir site

# A short benchmark run: ratios against raw torch hooks measured in the same rounds; fails
# only on a gross regression (see benchmarks/report.py --help for the limits).
bench: $(STAMP)
	mkdir -p .benchmarks
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest benchmarks -m quick -q -p no:randomly \
		--benchmark-enable --benchmark-disable-gc \
		--benchmark-min-rounds=5 --benchmark-max-time=0.2 --bench-pair-time=1.5 \
		--benchmark-json=.benchmarks/quick.json
	$(BIN)/python benchmarks/report.py .benchmarks/quick.json --gate

# The GPU check (docs/benchmarks.md, "GPU"): the CUDA tests and the GPU figures, into OUT
# (gpu_check.log, gpu_check.json). On a CUDA machine, run it with that machine's python3:
# no venv, no install (`make gpu OUT=<dir>`, or `python3 benchmarks/gpu/gpu_check.py <dir>`
# where make is missing). Without CUDA it checks its own wiring on a tiny model on the CPU,
# says so, and exits 0: `make test` runs that mode. The venv's python where there is one.
GPU_PYTHON ?=
OUT ?= .benchmarks/gpu
gpu:
	@py="$(GPU_PYTHON)"; \
	if [ -z "$$py" ]; then if [ -x $(BIN)/python ]; then py=$(BIN)/python; else py=python3; fi; fi; \
	echo "$$py benchmarks/gpu/gpu_check.py $(OUT)"; \
	PYTHONPATH="$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH}" "$$py" benchmarks/gpu/gpu_check.py "$(OUT)"

# The package as users install it: build the sdist and the wheel, install the wheel into a
# clean venv (with the pinned torch), then, from outside the source tree, import it, run the
# demo on the weights the wheel ships, and check the extras it declares.
WHEEL_DIR := $(VENV)/wheel-check
wheel: $(STAMP)
	rm -rf $(WHEEL_DIR)
	$(BIN)/python -m build --outdir $(WHEEL_DIR)/dist . > $(WHEEL_DIR).log 2>&1 || (cat $(WHEEL_DIR).log; exit 1)
	$(PYTHON) -m venv $(WHEEL_DIR)/venv
	$(WHEEL_DIR)/venv/bin/python -m pip install -q -c constraints.txt $(WHEEL_DIR)/dist/hookfn-*.whl
	cd $(WHEEL_DIR) && venv/bin/python -c "import hookfn, hookfn.nethook; \
		assert 'site-packages' in hookfn.__file__, hookfn.__file__; print('hookfn', hookfn.__version__)"
	cd $(WHEEL_DIR) && venv/bin/python -m hookfn.demo > demo.log
	cd $(WHEEL_DIR) && venv/bin/python -c "from importlib.metadata import metadata; \
		extras = set(metadata('hookfn').get_all('Provides-Extra')); \
		assert {'progress', 'plots', 'sae', 'test', 'docs', 'dev'} <= extras, extras; print('extras', sorted(extras))"
