# `make train` and `make test` set up .venv on first use (torch first: see README), then run.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ARGS ?=

.PHONY: setup train test test-fast mutation

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[all,test,deepspeed]'
	touch $(STAMP)

train: $(STAMP)
	$(BIN)/accelerate launch --config_file accelerate_config.yaml launch/train.py $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q $(ARGS)

# The fast tier (docs/testing.md): the in-process tests, no subprocess, launcher or loader worker.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not process" $(ARGS)

# Mutation testing (docs/testing.md; not part of CI): the functions MUTANTS names (fnmatch patterns
# of mutmut's mutant names) against the fast tests listed in pyproject.toml's [tool.mutmut].
# One thread per process: mutmut forks its workers, and a fork after torch's OpenMP pool started
# can hang (every such mutant then reads as a timeout).
MUTANTS ?= bidvl.objectives.* bidvl.distributed.x_build_optimizers__* bidvl.engine.*_frozen__* \
	bidvl.engine.*_backward__* bidvl.engine.*_optimizer_step__* bidvl.engine.*upper_level_step__* \
	bidvl.engine.*lower_level_step__* bidvl.engine.*_lower_level_phase__* bidvl.engine.*train_step__* \
	bidvl.engine.*set_learning_rates__* bidvl.nonfinite.* \
	bidvl.distributed.x_step_optimizer__* bidvl.models.ema.* bidvl.checkpoint.* \
	bidvl.data.reader.x__seed__* bidvl.data.reader.x_shuffled__* bidvl.data.reader.x__pick__* \
	bidvl.data.reader.*_TrainRoles* bidvl.data.reader.*TrainStream* bidvl.data.reader.*_EvalShards* \
	bidvl.data.reader.*EvalStream*

mutation: $(STAMP)
	$(BIN)/pip install -q 'mutmut==3.8.1'
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(BIN)/mutmut run --max-children 2 $(foreach m,$(MUTANTS),'$(m)')
	$(BIN)/python tools/mutation_report.py $(foreach m,$(MUTANTS),'$(m)')
