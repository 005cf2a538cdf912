# Set-up and main commands. `make demo` and `make test` work from a fresh clone (they create .venv).
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
# The CPU build of torch (on this machine it lies on disk; a plain `torch` would pull CUDA).
TORCH  := torch==2.13.0

.PHONY: install demo test test-all bench lint clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/moesteer demo

test: $(STAMP)
	$(PY) -m pytest -q

test-all: $(STAMP)
	$(PY) -m pytest -q -m ''

bench: $(STAMP)
	$(PY) bench/bench_steer.py

lint: $(STAMP)
	$(VENV)/bin/ruff check moesteer tests bench

clean:
	rm -rf $(VENV) build *.egg-info
