# Every target sets itself up: the virtualenv is created from requirements.txt when it is missing.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
KERNEL_CONFIG := $(VENV)/etc/ipython/ipython_kernel_config.py
PROFILE ?= default
export PYTHONHASHSEED := 0
# the tests draw nothing on screen; the book's kernels keep their inline backend (an exported Agg backend would
# leave every plt.show() in a chapter without an image)
TEST_ENV := MPLBACKEND=Agg

.PHONY: setup data mathjax lab test lint book book-quick book-recompute bench bench-probes bench-compare bench-gpu demo clean

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

setup: $(STAMP) data $(KERNEL_CONFIG)

# the kernels of this environment (jupyter-book, papermill, make lab) are all local: without this, ipykernel 7 prints
# a warning about unencrypted TCP at every start
$(KERNEL_CONFIG): $(STAMP)
	mkdir -p $(dir $(KERNEL_CONFIG))
	printf '%s\n' '# written by the Makefile (see its KERNEL_CONFIG rule)' 'c.IPKernelApp.log_level = "ERROR"' > $(KERNEL_CONFIG)

## data: Fashion-MNIST (the Debian package dataset-fashion-mnist) for the CNN chapter and its tests, where apt-get
## is available and we are root; otherwise say what happens without it
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
data:
	@if [ -e $(FASHION_MNIST) ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing the Debian package dataset-fashion-mnist (Fashion-MNIST, for the CNN chapter and its tests)"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) >/dev/null \
	    || echo "note: apt-get could not install dataset-fashion-mnist: the CNN chapter uses its stand-in (named on the page) and the Fashion-MNIST tests skip"; \
	else \
	  echo "note: Fashion-MNIST is not installed (it comes from the Debian package dataset-fashion-mnist, which needs apt-get and root:"; \
	  echo "      sudo apt-get install dataset-fashion-mnist). Without it the CNN chapter uses its stand-in, named on the page,"; \
	  echo "      and the two Fashion-MNIST tests skip."; \
	fi

## mathjax: MathJax 3 served from the built site (math renders offline), unpacked once from the npm package into
## _mathjax/ (gitignored); _config.yml copies it to _build/html/_static/mathjax/
MATHJAX_VERSION := 3.2.2
MATHJAX := _mathjax/mathjax/tex-chtml.js
$(MATHJAX):
	@command -v npm >/dev/null || { echo "error: the book serves MathJax $(MATHJAX_VERSION) itself (so that math renders offline) and fetches it once with npm, which is not installed. Install Node.js and npm (Debian: apt-get install npm) and rerun, or unpack the es5/ folder of the npm package mathjax@$(MATHJAX_VERSION) into _mathjax/mathjax/." >&2; exit 1; }
	rm -rf _mathjax.tmp && mkdir -p _mathjax.tmp
	cd _mathjax.tmp && npm pack --silent mathjax@$(MATHJAX_VERSION) >/dev/null
	tar -xzf _mathjax.tmp/mathjax-$(MATHJAX_VERSION).tgz -C _mathjax.tmp package/es5 package/LICENSE
	rm -rf _mathjax && mkdir -p _mathjax && mv _mathjax.tmp/package/es5 _mathjax/mathjax && mv _mathjax.tmp/package/LICENSE _mathjax/mathjax/
	@# keep tex-chtml.js and the components it loads on demand; drop the other combined builds (13 MB)
	find _mathjax/mathjax -maxdepth 1 -name '*.js' ! -name tex-chtml.js ! -name core.js ! -name loader.js ! -name startup.js -delete
	rm -rf _mathjax.tmp

mathjax: $(MATHJAX)

## lab: JupyterLab (pinned in requirements-lab.txt) on book/; a chapter's .py opens as a notebook with one click
## (LAB_ARGS: more options, e.g. LAB_ARGS="--no-browser --port 8889")
LAB_STAMP := $(VENV)/.installed-lab
LAB_SETTINGS := $(VENV)/share/jupyter/lab/settings/overrides.json
$(LAB_STAMP): $(STAMP) requirements-lab.txt
	$(PY) -m pip install --quiet -r requirements-lab.txt -c requirements.txt
	mkdir -p $(dir $(LAB_SETTINGS))
	echo '{"@jupyterlab/docmanager-extension:plugin": {"defaultViewers": {"python": "Jupytext Notebook"}}}' > $(LAB_SETTINGS)
	touch $(LAB_STAMP)

LAB_ARGS ?=
lab: $(LAB_STAMP) $(KERNEL_CONFIG)
	$(VENV)/bin/jupyter lab --ServerApp.root_dir=. --LabApp.default_url=/lab/tree/book $(LAB_ARGS)

## test: lint and the whole test suite (a few minutes on 2 CPU cores)
test: $(STAMP) data
	$(PY) -m ruff check influence_lib tests benchmarks book
	$(TEST_ENV) $(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check influence_lib tests benchmarks book

## book: the full site from the committed records in results/ (missing records are computed)
book: $(STAMP) data $(MATHJAX) $(KERNEL_CONFIG)
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
	$(PY) benchmarks/cnn_layout.py

## bench-probes: profile of the HVP-based methods and the speed-ups tried (benchmarks/results/probes.json), and
## the spectra behind EK-FAC-preconditioned CG (benchmarks/results/preconditioner_spectrum.json)
bench-probes: $(STAMP)
	$(PY) benchmarks/speed_probes.py
	$(PY) benchmarks/preconditioner_spectrum.py

## bench-compare: influence_lib against dattri, curvlinops, kronfluence (own virtualenv, BENCH_VENV)
BENCH_VENV ?= .venv-bench
bench-compare:
	test -x $(BENCH_VENV)/bin/python || python3 -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install --quiet -r requirements.txt -r benchmarks/requirements-bench.txt
	PYTHONPATH=. $(BENCH_VENV)/bin/python benchmarks/compare.py
	PYTHONPATH=. $(BENCH_VENV)/bin/python benchmarks/scale.py --anchor-python $(BENCH_VENV)/bin/python

## bench-gpu: the scale benchmark on a CUDA device (benchmarks/results/scale_gpu.json; refuses without one)
bench-gpu: $(STAMP)
	$(PY) benchmarks/scale.py --device cuda --threads 4

demo: $(STAMP)
	$(PY) -m influence_lib.experiments.demo

clean:
	rm -rf _build
