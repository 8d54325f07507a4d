# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install test test-slow demo bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

## Fast CPU suite (CI runs this).
test: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

## Longer checks, kept out of CI.
test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow tests

## Generate SynthSkill and prep it (skipped when done), then train and evaluate under 4-fold CV.
demo: $(STAMP)
	$(PY) -m data_prep.synthskill_setup --config=configs/demo.py
	$(PY) -m surgfusion_jax.main --config=configs/demo.py

## Benchmarks (JSON on stdout). The PAMFN side by side and the whole protocol take options:
## see docs/performance.md.
bench: $(STAMP)
	$(PY) benchmarks/train_step.py
	$(PY) benchmarks/prep.py
	$(PY) benchmarks/conv_in_scan.py
	$(PY) benchmarks/dra.py --lengths=1024,4096
	$(PY) benchmarks/protocol.py --seeds=1,4 --epochs=5

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
