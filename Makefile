# Both targets install what is missing first (apt packages, .venv), so a fresh machine
# needs nothing else. Run as root: the demo and the tests make namespaces and attach XDP.
.PHONY: setup demo test lint bench

setup:
	scripts/setup.sh

demo: setup
	.venv/bin/xsk-broker demo

test: setup
	.venv/bin/pytest $(PYTEST_ARGS)

lint: setup
	.venv/bin/ruff check . && .venv/bin/ruff format --check .

bench: setup
	.venv/bin/python -m bench.request_latency
	.venv/bin/python -m bench.hostile_load
	.venv/bin/python -m bench.cold_start
	.venv/bin/python -m bench.memory
