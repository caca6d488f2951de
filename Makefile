# teacal: `make demo` runs record -> fit -> sweep -> report on the tiny model; `make test` runs the tests.
# Both install into .venv first when needed.
VENV    ?= .venv
PY      := $(VENV)/bin/python
TEACAL  := $(VENV)/bin/teacal
RUN     ?= results/demo
STAMP   := $(VENV)/.installed

.PHONY: install test test-slow lint bench demo report train-tiny

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch and torchvision first, as a matched pair from this machine's disk (REFERENCE §5); nothing later may replace them.
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

test: install
	$(PY) -m pytest -q

test-slow: install
	$(PY) -m pytest -q -m slow

lint: install
	$(VENV)/bin/ruff check teacache calib tests

bench: install
	$(PY) -m calib.bench

# Retrain the embedded tiny model (about 20 min on one CPU thread): calib/weights/, docs/tiny/ (loss, edit success, samples).
train-tiny: install
	$(PY) -m calib.train_tiny train
	$(PY) -m calib.train_tiny evaluate
