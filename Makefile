# `make app` and `make test` are the README's two commands. Both create the
# virtual environment on first use and reinstall only when requirements.txt changes.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed-$(shell cat requirements.txt | cksum | cut -d' ' -f1)
PORT ?= 8501
# Spinning OpenMP workers slow small forward passes badly when the cores are shared.
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: app test test-fast bench install

install: $(INSTALLED)

$(INSTALLED): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -r requirements.txt
	rm -f $(VENV)/.installed-* && touch $@

app: $(INSTALLED)
	$(PY) -m headvis_core models fetch smollm2-135m
	$(VENV)/bin/streamlit run Home.py --server.port $(PORT)

test: $(INSTALLED)
	$(PY) -m pytest -q

test-fast: $(INSTALLED)
	$(PY) -m pytest -q -m "not real_model and not browser"

bench: $(INSTALLED)
	for script in bench/*.py; do echo "== $$script"; $(PY) $$script || exit 1; done
