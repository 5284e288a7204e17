PYTHON ?= python

.PHONY: test run check-py39 bench

# Install what the tests need, then run them (the README's test command).
test:
	$(PYTHON) -m pip install -q -r requirements-test.txt
	$(PYTHON) -m pytest

# The broker and four supervised workers; Ctrl-C stops them all.
run:
	@$(PYTHON) broker.py & broker=$$!; \
	trap 'kill $$broker 2>/dev/null; wait $$broker' EXIT INT TERM; \
	$(PYTHON) worker.py --processes 4

# The programs must run on Python 3.9 and newer.
check-py39:
	vermin --no-tips -t=3.9- broker.py worker.py bbolt_lite.py

bench:
	$(PYTHON) bench/bbolt_bench.py
