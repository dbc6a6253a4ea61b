# Two entry points: `make demo` (serve the starter model) and `make test` (the whole suite).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
MODEL  ?= demo/starter-model
HOST   ?= 127.0.0.1
PORT   ?= 7860
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup demo predict test browser bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

demo: setup
	$(BIN)/python demo/app.py --model $(MODEL) --host $(HOST) --port $(PORT)

predict: setup
	$(BIN)/chest-model predict --model $(MODEL) examples/*.jpeg

# Debian's Chromium for the browser test (Playwright cannot download browsers offline).
browser:
	@command -v chromium >/dev/null 2>&1 || { $(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium fonts-dejavu-core >/dev/null; }

# One pytest worker per core (at most 4, for memory): much of the suite waits on subprocesses that
# start Python, a server or a training run, and a second worker fills that time.
test: setup browser
	$(BIN)/python -m pytest -n logical --maxprocesses 4 --dist worksteal

bench: setup
	$(BIN)/python bench/train_throughput.py
	$(BIN)/python bench/infer_latency.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
