# The two commands a fresh machine needs: `make demo` and `make test`.
# Each creates or updates the local virtual environment first.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet torch==2.13.0
	$(PYTHON) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(PYTHON) examples/quickstart.py

# pytest-xdist: one worker per core (the CI machine has 2), at most 4 as each takes up to 2 GB;
# worksteal evens out the tests' very unequal durations.
test: $(STAMP)
	$(PYTHON) -m pytest -q -n auto --maxprocesses=4 --dist worksteal

clean:
	rm -rf $(VENV) build *.egg-info
