# The two commands of the quick start: `make demo` and `make test`.
# Both create .venv when missing and install pinned dependencies, torch==2.13.0 first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt setuptools wheel numpy
	# qpth (a peer, for comparisons) pins numpy<2 in its metadata and does not build under
	# build isolation: installed on its own, without its dependency pins.
	$(BIN)/pip install -q -c constraints.txt --no-build-isolation --no-deps qpth
	$(BIN)/pip install -q -c constraints.txt -e ".[ref,peers,plot,test]"
	touch $@

demo: $(STAMP)
	$(BIN)/amortized demo --out demo-out

test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

clean:
	rm -rf $(VENV) demo-out
