# The README's commands. On a fresh machine the first `make demo` or `make test` creates .venv and installs
# the package from this repository's files (CPU torch from requirements-cpu.txt, then `pip install -e .[test]`).
#
#   make demo       the offline demo (tiny model, generated X-rays; CPU, no network)
#   make test       every test, slow ones too (what CI runs), on 2 pytest-xdist workers (--dist loadfile:
#                   a file's tests stay on one worker, so a module fixture (the demo run, a trained tiny model,
#                   a built wheel) runs once; xdist 3.8's loadgroup ignores xdist_group marks under pytest 9.2)
#   make test-fast  the fast tests (-m "not slow": what a developer runs before each commit)
#   make lint       ruff
#
# CI installs into its own interpreter and reuses the same commands: make test lint PY=python3 SETUP=
PYTHON ?= python3
VENV ?= .venv
PY ?= $(VENV)/bin/python
SETUP ?= $(VENV)/.installed

.PHONY: setup demo test test-fast lint

$(VENV)/.installed: requirements-cpu.txt pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q -r requirements-cpu.txt
	$(VENV)/bin/python -m pip install -q -e ".[test]"
	touch $@

setup: $(SETUP)

demo: $(SETUP)
	$(PY) -m unsloth_med.recipes.bone_fracture --demo

# One torch thread per worker (and per process a test starts): two workers with a thread per core each put four
# busy threads on two cores. Measured on the 2-core machine, clean clones of the same tree: `make test` 605 s with
# one thread against 821 and 1,192 s without (test_demo's 1,500-step run 285 s against 384 and 752 s).
test: $(SETUP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --dist loadfile --durations=25

test-fast: $(SETUP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --dist loadfile -m "not slow"

lint: $(SETUP)
	$(PY) -m ruff check .
