# The two commands of the README: `make demo` (set up, ingest a bundled corpus, query it) and
# `make test` (set up, run every test). Both work on a fresh machine with python3 >= 3.11.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A CPU build of torch for machines without a GPU; on a GPU machine: make TORCH_SPEC=torch ...
TORCH_SPEC ?= torch==2.13.0
DEMO_DIR ?= data

export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup demo test test-fast lint clean FORCE

setup: $(VENV)/.installed

# The install stamp depends on the torch spec too: `make demo TORCH_SPEC=torch` after a CPU install
# reinstalls torch instead of keeping the CPU build. .torch-spec changes only when the spec does.
$(VENV)/.torch-spec: FORCE
	@mkdir -p $(VENV)
	@echo '$(TORCH_SPEC)' | cmp -s - $@ || echo '$(TORCH_SPEC)' > $@

$(VENV)/.installed: pyproject.toml $(VENV)/.torch-spec
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --quiet --upgrade pip
	$(BIN)/pip install --quiet --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet --quiet -e ".[dev]"
	touch $@

FORCE:

demo: setup
	$(BIN)/embedpipe sample-corpus $(DEMO_DIR)/pydoc-topics
	$(BIN)/embedpipe ingest $(DEMO_DIR)/pydoc-topics --db $(DEMO_DIR)/pydoc-db --config configs/local.yaml
	$(BIN)/embedpipe query "how do I catch an exception and re-raise it" --db $(DEMO_DIR)/pydoc-db -k 5

# Azurite, the Azure Storage emulator, for tests/test_azure.py: pinned, as 3.36+ wants Node 22. Without npm
# the Azure tests are skipped (on CI, where CI is set, they fail instead).
AZURITE := $(VENV)/azurite/node_modules/.bin/azurite-blob

$(AZURITE):
	@if command -v npm >/dev/null; then \
		npm install --silent --no-audit --no-fund --cache $(VENV)/azurite/.npm --prefix $(VENV)/azurite azurite@3.35.0; \
	else echo "npm not found: tests/test_azure.py will be skipped"; fi

test: setup $(AZURITE)
	$(BIN)/pytest

test-fast: setup $(AZURITE)
	$(BIN)/pytest -m "not slow"

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache
