"""Build the Go helpers offline, in GOPATH mode: interop/'s, and bench/'s.

`boltcheck` (and bench/'s `gobroker`) drive Debian's bbolt and rs/xid (the Go
packages that `apt-get install golang-go golang-github-coreos-bbolt-dev
golang-github-rs-xid-dev` puts under /usr/share/gocode); `goworker`,
`goproducer` and `goload` need only Go's standard library. No module proxy is asked for anything.
"""

import os
import shutil
import subprocess

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
GOPATH = os.environ.get("INTEROP_GOPATH", "/usr/share/gocode")
GO_PACKAGES = {"boltcheck": ("go.etcd.io/bbolt", "github.com/rs/xid"), "goworker": (),
               "goproducer": (), "gobroker": ("go.etcd.io/bbolt", "github.com/rs/xid"),
               "goload": ()}
SOURCES = {"boltcheck": "interop", "goworker": "interop", "goproducer": "interop",
           "gobroker": "bench", "goload": "bench"}


class GoMissing(Exception):
    """No Go toolchain, or the Go packages are not installed."""


def build(command, out_dir):
    """Build <interop or bench>/<command> into `out_dir`; return the binary's path."""
    go = shutil.which("go")
    if go is None:
        raise GoMissing("no Go toolchain (apt-get install golang-go)")
    for package in GO_PACKAGES[command]:
        if not os.path.isdir(os.path.join(GOPATH, "src", package)):
            raise GoMissing("Go package %s missing under %s (apt-get install "
                            "golang-github-coreos-bbolt-dev golang-github-rs-xid-dev)"
                            % (package, GOPATH))
    out_dir = str(out_dir)
    env = dict(os.environ, GOPATH=GOPATH, GO111MODULE="off", GOFLAGS="",
               GOCACHE=os.path.join(out_dir, "cache"), GOPROXY="off", CGO_ENABLED="0")
    binary = os.path.join(out_dir, command)
    source = "%s/%s" % (SOURCES[command], command)
    result = subprocess.run([go, "build", "-o", binary, "./" + source], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        raise RuntimeError("building %s failed:\n%s" % (source, result.stderr))
    return binary

