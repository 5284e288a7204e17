"""A short chaos run in the suite: faults everywhere, then an exact reconciliation.

bench/chaos.py does the work (run it longer by hand); see its docstring for
the faults and the checks.
"""

import os
import sys

from conftest import HERE

sys.path.insert(0, os.path.join(HERE, "bench"))
import chaos  # noqa: E402


def test_under_kills_stops_cut_streams_and_broker_restarts_nothing_is_lost_or_doubled(tmp_path):
    report = chaos.run(seconds=10, total=3000, seed=11, work=str(tmp_path), quiet=True)
    assert report["problems"] == [], report
    assert report["lost"] == 0 and report["duplicated"] == 0
    assert report["generated"] == 3000 and report["done"] + report["dead"] == 3000
    assert sum(report["injected"].values()) > 10, report["injected"]
    assert report["broker_runs"] >= 2, report  # the broker was restarted at least once
