"""Build the Go helper (interop/boltcheck) against Debian's bbolt and rs/xid.

GOPATH mode and no module proxy: it works offline, with the Go packages that
`apt-get install golang-go golang-github-coreos-bbolt-dev
golang-github-rs-xid-dev` puts under /usr/share/gocode.
"""

import os
import shutil
import subprocess

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
GOPATH = os.environ.get("INTEROP_GOPATH", "/usr/share/gocode")
GO_PACKAGES = ("go.etcd.io/bbolt", "github.com/rs/xid")


class GoMissing(Exception):
    """No Go toolchain, or the Go packages are not installed."""


def build_boltcheck(out_dir):
    """Build the helper into `out_dir`; return its path."""
    go = shutil.which("go")
    if go is None:
        raise GoMissing("no Go toolchain (apt-get install golang-go)")
    for package in GO_PACKAGES:
        if not os.path.isdir(os.path.join(GOPATH, "src", package)):
            raise GoMissing("Go package %s missing under %s (apt-get install "
                            "golang-github-coreos-bbolt-dev golang-github-rs-xid-dev)"
                            % (package, GOPATH))
    out_dir = str(out_dir)
    env = dict(os.environ, GOPATH=GOPATH, GO111MODULE="off", GOFLAGS="",
               GOCACHE=os.path.join(out_dir, "cache"), GOPROXY="off", CGO_ENABLED="0")
    binary = os.path.join(out_dir, "boltcheck")
    result = subprocess.run([go, "build", "-o", binary, "./interop/boltcheck"], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        raise RuntimeError("building the Go helper failed:\n" + result.stderr)
    return binary
