# Every target sets itself up: the virtualenv is created from requirements.txt when it is missing.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PROFILE ?= default
export PYTHONHASHSEED := 0
# the tests draw nothing on screen; the book's kernels keep their inline backend (an exported Agg backend would
# leave every plt.show() in a chapter without an image)
TEST_ENV := MPLBACKEND=Agg

.PHONY: setup test lint book book-quick book-recompute bench bench-probes bench-compare demo clean

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)

## test: lint and the whole test suite (a few minutes on 2 CPU cores)
test: $(STAMP)
	$(PY) -m ruff check influence_lib tests benchmarks book
	$(TEST_ENV) $(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check influence_lib tests benchmarks book

## book: the full site from the committed records in results/ (missing records are computed)
book: $(STAMP)
	IL_PROFILE=$(PROFILE) $(VENV)/bin/jupyter-book build --all -W --keep-going .
	@echo "open _build/html/index.html"

## book-quick: every chapter on tiny settings (records under results/quick/), as CI does
book-quick:
	$(MAKE) book PROFILE=quick

## book-recompute: recompute every record of the default profile, then build
book-recompute: $(STAMP)
	IL_RECOMPUTE=1 $(MAKE) book

bench: $(STAMP)
	$(PY) benchmarks/bench_core.py

## bench-probes: profile of the HVP-based methods and the speed-ups tried (benchmarks/results/probes.json)
bench-probes: $(STAMP)
	$(PY) benchmarks/speed_probes.py

## bench-compare: influence_lib against dattri, curvlinops, kronfluence (own virtualenv, BENCH_VENV)
BENCH_VENV ?= .venv-bench
bench-compare:
	test -x $(BENCH_VENV)/bin/python || python3 -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install --quiet -r requirements.txt -r benchmarks/requirements-bench.txt
	PYTHONPATH=. $(BENCH_VENV)/bin/python benchmarks/compare.py

demo: $(STAMP)
	$(PY) -m influence_lib.demo

clean:
	rm -rf _build
