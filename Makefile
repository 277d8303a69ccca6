# Both targets install what is missing first (apt packages, .venv), so a fresh machine
# needs nothing else. Run as root: the demo and the tests make namespaces and attach XDP.
.PHONY: setup demo test test-fresh lint bench

setup:
	scripts/setup.sh

# Through scripts/public-view.sh: the unprivileged processes of the demo and the tests must
# reach the venv and the checkout wherever it was cloned (python -m, so that sys.executable
# is the path they can reach).
demo: setup
	scripts/public-view.sh .venv/bin/python -m xsk_broker demo

test: setup
	scripts/public-view.sh .venv/bin/python -m pytest $(PYTEST_ARGS)

# CI as on a new machine: fresh clone under a 0700 directory, every cache empty.
test-fresh:
	scripts/test-fresh.sh

lint: setup
	.venv/bin/ruff check . && .venv/bin/ruff format --check . && .venv/bin/mypy

bench: setup
	scripts/public-view.sh sh -c 'for b in request_latency hostile_load cold_start memory dataplane metrics_write dpdk_rx; do \
	    .venv/bin/python -m bench.$$b || exit; done'
