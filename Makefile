# Two commands for a fresh machine: `make demo` and `make test`. Each creates .venv and installs
# what it needs the first time (and again whenever setup.cfg or this file changes).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The tested torch/torchvision pair; setup.cfg keeps ranges for other machines.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
# albumentations pulls opencv-python-headless, we ask for opencv-python: both own the `cv2` folder.
# Installing the same version of both means whichever writes last leaves an identical cv2.
OPENCV_VERSION := 5.0.0.93
export NO_ALBUMENTATIONS_UPDATE := 1
export PYTHONUNBUFFERED := 1

.PHONY: install test test-slow lint demo clean

$(STAMP): setup.cfg pyproject.toml Makefile
	@echo "[demo 1/6] installing torch and the project into $(VENV) (first time only, about 1.5 minutes)"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip >/dev/null
	$(PY) -m pip install $(TORCH_PINS)
	$(PY) -m pip install -e '.[dev]' opencv-python==$(OPENCV_VERSION) opencv-python-headless==$(OPENCV_VERSION)
	$(PY) -c "import cv2, torch, segmentation_models_pytorch, albumentations; print('installed: torch', torch.__version__, 'cv2', cv2.__version__)"
	touch $(STAMP)

install: $(STAMP)

# Two pytest-xdist workers, one per core (tests/conftest.py gives each one torch thread); a file's tests stay on
# one worker, sharing its module fixtures.
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile

# The end-to-end tier (CI runs it after lint; about 6 minutes on 2 cores).
test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

lint: $(STAMP)
	$(VENV)/bin/ruff check seg tools tests benchmarks

demo: $(STAMP)
	$(PY) tools/demo.py

clean:
	rm -rf $(VENV) checkpoints/demo
