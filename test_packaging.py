"""The ways in besides copying the three files: `pip install .` (commands
`broker`, `worker`, `bbolt-lite`), the systemd unit, the licence headers,
and one --version for the three programs."""

import os
import re
import shutil
import subprocess
import sys


import bbolt_lite
import broker
import worker
from conftest import HERE, skip_or_fail

PROGRAMS = ("broker.py", "worker.py", "bbolt_lite.py")
MODULES = PROGRAMS + ("broker_jetstream.py",)  # (imported by broker.py --jetstream)


def test_each_program_is_executable_with_its_licence_header():
    with open(os.path.join(HERE, "LICENSE")) as f:
        assert f.readline().strip() == "MIT License"
    for program in PROGRAMS:
        path = os.path.join(HERE, program)
        assert os.access(path, os.X_OK), program
        with open(path) as f:
            assert f.readline() == "#!/usr/bin/env python3\n"
            assert f.readline() == "# SPDX-License-Identifier: MIT\n"
        result = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30)
        assert result.stdout.strip() == "%s %s" % (program, broker.__version__)


def test_pip_install_in_a_fresh_venv_gives_commands_that_run_the_whole_system(tmp_path):
    try:
        import setuptools  # noqa: F401
        import wheel  # noqa: F401
    except ImportError:
        skip_or_fail("no setuptools or wheel (pip install -r requirements-test.txt)")
    source = tmp_path / "source"  # (a copy: the build leaves nothing in the work tree)
    source.mkdir()
    for name in MODULES + ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(os.path.join(HERE, name), source / name)
    # The wheel is built here, offline, and installed into a venv that has
    # nothing else: no dependency is needed at run time.
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", str(source), "-w", str(tmp_path / "dist")],
                   check=True, capture_output=True, timeout=300)
    wheels = list((tmp_path / "dist").glob("*.whl"))
    assert len(wheels) == 1 and broker.__version__ in wheels[0].name
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--no-index", str(wheels[0])],
                   check=True, capture_output=True, timeout=300)
    run = tmp_path / "run"  # away from the sources: the installed modules run
    run.mkdir()
    db = run / "broker.db"
    result = subprocess.run([str(venv / "bin" / "broker"), "--port", "0", "--db", str(db),
                             "--total", "100", "--workers", "2", "--log-level", "WARNING"],
                            cwd=run, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert re.search(r"all 100 messages settled: \d+ done, \d+ dead", result.stderr)
    assert "Traceback" not in result.stderr
    checked = subprocess.run([str(venv / "bin" / "bbolt-lite"), "check", str(db)],
                             capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0 and checked.stdout.strip() == "OK"
    version = subprocess.run([str(venv / "bin" / "worker"), "--version"], capture_output=True,
                             text=True, timeout=60)
    assert version.stdout.strip() == "worker %s" % broker.__version__  # (the same program)
    usage = subprocess.run([str(venv / "bin" / "broker"), "dead", "--help"], capture_output=True,
                           text=True, timeout=60)
    assert usage.stdout.startswith("usage: broker dead ")  # (its name as installed)


def test_the_systemd_unit_passes_systemd_analyze_verify():
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        skip_or_fail("no systemd-analyze (apt-get install systemd)")
    unit = os.path.join(HERE, "contrib", "broker.service")
    result = subprocess.run([analyze, "verify", unit], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0 and result.stdout + result.stderr == "", result.stderr
    with open(unit) as f:
        text = f.read()
    for setting in ("DynamicUser=yes", "StateDirectory=broker", "ProtectSystem=strict",
                    "Restart=on-failure", "KillSignal=SIGTERM"):
        assert re.search(r"^%s$" % re.escape(setting), text, re.M), setting
    drain = float(re.search(r"--drain-timeout (\d+)", text).group(1))
    assert float(re.search(r"^TimeoutStopSec=(\d+)$", text, re.M).group(1)) > drain + 10


# --- versions ----------------------------------------------------------------------------


def test_version_on_all_three_programs():
    assert broker.__version__ == worker.__version__ == bbolt_lite.__version__
    assert re.fullmatch(r"\d+\.\d+\.\d+", broker.__version__)
    for program in ("broker.py", "worker.py", "bbolt_lite.py"):
        result = subprocess.run([sys.executable, program, "--version"], cwd=HERE,
                                capture_output=True, text=True, timeout=30)
        assert result.returncode == 0
        assert result.stdout.strip() == "%s %s" % (program, broker.__version__)
