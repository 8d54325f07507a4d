# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

# Pinned versions per Python (`make lock` writes them); `make demo` / `make test` install
# with them as constraints so results do not move with new releases. `pip install -e .`
# stays unpinned for library users.
LOCK_PYTHONS ?= 3.10 3.11 3.12 3.13
LOCK_VENV    ?= build/lock-venv
UV_VERSION   ?= 0.13.9
PY_VERSION    = $$($(PY) -c 'import sys; print("%d.%d" % sys.version_info[:2])')

.PHONY: install test test-slow demo bench clean lock

$(STAMP): pyproject.toml $(wildcard requirements/lock-py*.txt)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@lock=requirements/lock-py$(PY_VERSION).txt; test -f $$lock || { \
	  echo "error: no lock file $$lock for Python $(PY_VERSION) of $(VENV); fix: use one of" \
	    "Python $(LOCK_PYTHONS) (rm -rf $(VENV); make PYTHON=python3.11 ...) or add the" \
	    "version to LOCK_PYTHONS and run make lock." >&2; exit 2; }
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c requirements/lock-py$(PY_VERSION).txt -e '.[test]'
	touch $(STAMP)

## Regenerate requirements/lock-py<version>.txt for every Python in LOCK_PYTHONS (uv, in
## its own venv). Existing pins are kept unless UPGRADE=1.
lock:
	test -x $(LOCK_VENV)/bin/uv || { $(PYTHON) -m venv $(LOCK_VENV) && \
	  $(LOCK_VENV)/bin/python -m pip install -q uv==$(UV_VERSION); }
	mkdir -p requirements
	for v in $(LOCK_PYTHONS); do \
	  $(LOCK_VENV)/bin/uv pip compile pyproject.toml --extra test --universal \
	    --python-version $$v $(if $(UPGRADE),--upgrade) --custom-compile-command "make lock" \
	    --quiet -o requirements/lock-py$$v.txt || exit 1; \
	done

install: $(STAMP)

## Fast CPU suite (CI runs this), Beam prep included (apache-beam is in the `test` extra).
## TEST_WORKERS pytest-xdist processes, one test file each at a time (module fixtures
## stay in one process); the suite is bound by XLA compile time, which is single-threaded.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(PY) -m pytest -q -m "not slow" -n $(TEST_WORKERS) --dist loadfile --durations=25 tests

## Longer checks, kept out of CI.
test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow -n $(TEST_WORKERS) --dist loadfile tests

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
