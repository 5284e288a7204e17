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
	vermin --no-tips -t=3.9- broker.py worker.py bbolt_lite.py broker_jetstream.py

# Benchmarks (minutes; see bench/README.md). The Go comparisons need Go and
# Debian's bbolt and rs/xid sources (see README.md); without Go they are skipped.
bench:
	if command -v go >/dev/null; then $(PYTHON) bench/gobench.py && $(PYTHON) bench/bbolt_bench.py; \
	else echo 'no Go: bench/gobench.py and bench/bbolt_bench.py not run'; fi
	$(PYTHON) bench/broker_bench.py --repeat 5 --half-load
	$(PYTHON) bench/broker_bench.py --fail 0.2 --no-ceiling
	$(PYTHON) bench/soak.py --total 1000000
	$(PYTHON) bench/worker_bench.py --total 5000 --processes 4 --time-scale 0
	$(PYTHON) bench/poison.py --total 3000 --runs 2 --compare 0aed286
	if command -v nats-server >/dev/null; then $(PYTHON) bench/jetstream_bench.py --repeat 3; \
	else echo 'no nats-server: bench/jetstream_bench.py not run'; fi
