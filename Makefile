PYTHON ?= python

.PHONY: test run check-py39 bench

# Install what the tests need, then run them (the README's test command).
test:
	$(PYTHON) -m pip install -q -r requirements-test.txt
	$(PYTHON) -m pytest

# The broker and four supervised workers (its child); Ctrl-C stops them all.
run:
	$(PYTHON) broker.py --workers 4

# The programs must run on Python 3.9 and newer.
check-py39:
	vermin --no-tips -t=3.9- broker.py worker.py bbolt_lite.py

# Benchmarks (minutes; see bench/README.md).
bench:
	$(PYTHON) bench/bbolt_bench.py
	$(PYTHON) bench/broker_bench.py
	$(PYTHON) bench/broker_bench.py --fail 0.2 --no-ceiling
	$(PYTHON) bench/broker_bench.py --rate 80 --no-ceiling
