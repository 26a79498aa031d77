# The two commands the README opens with: `make demo` and `make test`. Each builds its own virtual
# environment. torch==2.13.0 is installed first: an open torch requirement would pull a multi-GB CUDA build.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH ?= torch==2.13.0
EXTRAS ?= dev,postgres,onnx,openvino,report,examples

.PHONY: demo test lint setup clean browser

# the demo needs optagent alone; the tests every extra (runtimes, PostgreSQL, reports, the transformer examples)
$(VENV)/.base: pyproject.toml setup.py
	python3 -m venv $(VENV)
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e .
	touch $@

$(VENV)/.installed: $(VENV)/.base
	$(PIP) install -q -e ".[$(EXTRAS)]"
	touch $@

setup: $(VENV)/.installed

demo: $(VENV)/.base
	$(VENV)/bin/optagent search examples/digits_cnn.py --trials 12 --workers 2 --db sqlite:///demo.db \
		--strategies pruning,finetune,quantization,batch_size

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check agent plugins workers tests benchmarks examples
	$(VENV)/bin/mypy

# the report test renders in Debian's headless Chromium; install it when missing and we may
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || \
		echo "note: chromium not installed; the report rendering test will skip (or fail under CI=true)"; }

# two pytest processes, a test file each at a time (module fixtures stay in one process): much of the suite
# waits on subprocesses, workers and brokers, so the second core does the other file's work meanwhile
test: lint browser
	$(VENV)/bin/pytest -q -n 2 --dist loadfile

clean:
	rm -rf $(VENV) demo.db
