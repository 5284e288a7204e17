"""Shared fixtures: the Go interop helper, and the rule that CI never skips it.

Tests that need Go (the real bbolt and rs/xid libraries) use the `boltcheck`
fixture. Without a Go toolchain and Debian's Go packages they skip, unless
REQUIRE_INTEROP=1 is set (as .ci/run does): then a missing Go fails them.
"""

import os
import shutil
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
GOPATH = os.environ.get("INTEROP_GOPATH", "/usr/share/gocode")
REQUIRE_INTEROP = os.environ.get("REQUIRE_INTEROP") == "1"


def skip_or_fail(reason):
    """Skip, or fail when REQUIRE_INTEROP=1 forbids skipping interop tests."""
    if REQUIRE_INTEROP:
        pytest.fail("REQUIRE_INTEROP=1 but " + reason)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def boltcheck(tmp_path_factory):
    """Path of the Go helper built from interop/boltcheck against real bbolt and xid."""
    go = shutil.which("go")
    if go is None:
        skip_or_fail("no Go toolchain (apt-get install golang-go)")
    for package in ("go.etcd.io/bbolt", "github.com/rs/xid"):
        if not os.path.isdir(os.path.join(GOPATH, "src", package)):
            skip_or_fail("Go package %s missing under %s (apt-get install "
                         "golang-github-coreos-bbolt-dev golang-github-rs-xid-dev)"
                         % (package, GOPATH))
    out = tmp_path_factory.mktemp("go")
    env = dict(os.environ, GOPATH=GOPATH, GO111MODULE="off", GOFLAGS="",
               GOCACHE=str(out / "cache"), GOPROXY="off", CGO_ENABLED="0")
    binary = str(out / "boltcheck")
    result = subprocess.run([go, "build", "-o", binary, "./interop/boltcheck"], cwd=HERE,
                            env=env, capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        pytest.fail("building the Go helper failed:\n" + result.stderr)
    return binary


def run_boltcheck(binary, *args, timeout=120):
    return subprocess.run([binary] + [str(a) for a in args], capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture
def python_exe():
    return sys.executable
