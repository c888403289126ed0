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
# The Flower adapter's environment: flwr pins exact minors of FastAPI/uvicorn/starlette/rich/packaging,
# so it gets its own venv (engine + flwr + pytest, no napari). The pin is the newest flwr the adapter's
# tests passed with (1.41.0 passed too; the [flower] extra allows 1.40-1.42).
FLOWER_VENV ?= .venv-flower
FLWR        ?= flwr==1.42.0
FLOWER_STAMP := $(FLOWER_VENV)/.installed
FPIP        := $(FLOWER_VENV)/bin/python -m pip --disable-pip-version-check -q
# The suite runs in two worker processes (pytest-xdist), one test per unit of work so each worker starts
# with one of the slow end-to-end tests (tests/conftest.py puts them first); TEST_WORKERS=0 runs it in one.
TEST_WORKERS ?= 2
XDIST        := -n $(TEST_WORKERS) --dist loadgroup

.PHONY: venv flower-venv demo test test-flower lint bench-speed bench-quality bench-alignment bench-video clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip 2>&1 | grep -v "is ignored" || true
	$(PIP) install $(TORCH) 2>&1 | grep -v "is ignored" || true
	$(PIP) install -e ".[napari,test]" 2>&1 | grep -v "is ignored" || true
	$(BIN)/python -c "import torch, napari, fedmix_engine; print('torch', torch.__version__, '| napari', napari.__version__)"
	touch $(STAMP)

flower-venv: $(FLOWER_STAMP)

$(FLOWER_STAMP): pyproject.toml Makefile
	test -x $(FLOWER_VENV)/bin/python || $(PYTHON) -m venv $(FLOWER_VENV)
	$(FPIP) install --upgrade pip 2>&1 | grep -v "is ignored" || true
	$(FPIP) install $(TORCH) 2>&1 | grep -v "is ignored" || true
	$(FPIP) install -e ".[flower]" "$(FLWR)" "pytest>=8" "pytest-xdist>=3" "pytest-timeout>=2.2" 2>&1 | grep -v "is ignored" || true
	$(FLOWER_VENV)/bin/python -c "import flwr, torch, fedmix_engine.federation.flower.app; print('flwr', flwr.__version__)"
	touch $(FLOWER_STAMP)

## demo: a real local federation — server + 3 site processes (A masks, B boxes, C tags) on 127.0.0.1
demo: venv
	$(BIN)/fedmix-engine demo runs/demo

## test: lint, validate the napari manifest, run the whole suite (GUI tests under Xvfb via pytest-xvfb),
## then the Flower adapter's tests in their own environment
test: venv lint
	$(BIN)/npe2 validate napari-fedmix --imports
	$(BIN)/python -m pytest $(XDIST)
	$(MAKE) test-flower

test-flower: flower-venv
	$(FLOWER_VENV)/bin/python -m pytest $(XDIST) -m flower tests/test_flower.py

lint: venv
	$(BIN)/ruff check src tests benchmarks docs

bench-speed: venv
	$(BIN)/python benchmarks/speed.py

bench-quality: venv
	$(BIN)/python benchmarks/quality.py

bench-alignment: venv
	$(BIN)/python benchmarks/alignment.py

bench-video: venv
	$(BIN)/python benchmarks/video_frames.py

clean:
	rm -rf $(VENV) $(FLOWER_VENV) runs build *.egg-info src/*.egg-info .pytest_cache .ruff_cache
