# `make train` and `make test` set up .venv on first use (torch first: see README), then run.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ARGS ?=

.PHONY: setup train test

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[test,deepspeed]'
	touch $(STAMP)

train: $(STAMP)
	$(BIN)/accelerate launch --config_file accelerate_config.yaml launch/train.py $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q $(ARGS)
