# `make app` and `make test` are the README's two commands. Both create the
# virtual environment on first use and reinstall only when pyproject.toml changes.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
PORT ?= 8501
# Spinning OpenMP workers slow small forward passes badly when the cores are shared.
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: app test test-fast lint bench install

install: $(INSTALLED)

# The project itself is installed (editable, with the test, ray and umap extras), so tests and
# bench/ import headvis_core without sys.path tricks and `headvis` is on the PATH.
$(INSTALLED): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -e ".[test,ray,umap]"
	rm -f $(VENV)/.installed-* && touch $@

app: $(INSTALLED)
	$(PY) -m headvis_core models fetch smollm2-135m
	$(VENV)/bin/streamlit run Home.py --server.port $(PORT)

test: $(INSTALLED)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

test-fast: $(INSTALLED)
	$(PY) -m pytest -q -m "not real_model and not browser"

lint: $(INSTALLED)
	$(VENV)/bin/ruff check .

bench: $(INSTALLED)
	for script in bench/*.py; do echo "== $$script"; $(PY) $$script || exit 1; done
