# The README's two commands: `make demo` (set up + run the main job) and `make test` (set up + run the suite).
# Everything installs into ./.venv; nothing is downloaded at run time.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Which torch build: the pin takes the local CPU wheel here and the default CUDA build on a CUDA workstation.
# Another build: make TORCH="torch==2.13.0 --index-url <your PyTorch wheel index>" ...
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed
PIP    := $(BIN)/python -m pip --disable-pip-version-check -q

.PHONY: venv demo test lint bench-speed bench-quality clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip 2>&1 | grep -v "is ignored" || true
	$(PIP) install $(TORCH) 2>&1 | grep -v "is ignored" || true
	$(PIP) install -e ".[napari,test]" 2>&1 | grep -v "is ignored" || true
	$(BIN)/python -c "import torch, napari, fedmix_engine; print('torch', torch.__version__, '| napari', napari.__version__)"
	touch $(STAMP)

## demo: a real local federation — server + 3 site processes (A masks, B boxes, C tags) on 127.0.0.1
demo: venv
	$(BIN)/fedmix-engine demo runs/demo

## test: lint, validate the napari manifest, run the whole suite (GUI tests under Xvfb via pytest-xvfb)
test: venv lint
	$(BIN)/npe2 validate napari-fedmix --imports
	$(BIN)/python -m pytest

lint: venv
	$(BIN)/ruff check src tests benchmarks docs

bench-speed: venv
	$(BIN)/python benchmarks/speed.py

bench-quality: venv
	$(BIN)/python benchmarks/quality.py

clean:
	rm -rf $(VENV) runs build *.egg-info src/*.egg-info .pytest_cache .ruff_cache
