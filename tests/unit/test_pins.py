"""The TOOLS pin table: every component complete, digests well-formed, the binary set exact."""

import re

import pytest

from captainos.core import pins
from captainos.core.config import Arch, Config

SHA256 = re.compile(r"^[0-9a-f]{64}$")
H1 = re.compile(r"^h1:[A-Za-z0-9+/]{43}=$")
SEMVER = re.compile(r"^[0-9]+\.[0-9]+\.[0-9]+$")

EXPECTED = {
    "usr/bin": {"containerd", "containerd-shim-runc-v2", "ctr", "runc", "nerdctl"},
    "opt/cni/bin": {"bridge", "host-local", "loopback", "portmap", "firewall", "tuning"},
}


def test_the_image_gets_exactly_the_eleven_binaries_of_the_issue():
    found: dict[str, set[str]] = {}
    for pin in pins.TOOLS:
        found.setdefault(pin.dest, set()).update(pin.binaries)
    assert found == EXPECTED
    every = [b for pin in pins.TOOLS for b in pin.binaries]
    assert len(every) == len(set(every)) == 11


def test_versions_are_the_pinned_stack():
    assert {p.name: p.version for p in pins.TOOLS} == {
        "containerd": "2.2.1", "runc": "1.4.0", "nerdctl": "2.2.1", "cni-plugins": "1.6.0"}


@pytest.mark.parametrize("pin", pins.TOOLS, ids=lambda p: p.name)
def test_every_component_is_complete(pin):
    assert SEMVER.match(pin.version), "version without the leading v"
    assert pin.module_path.startswith("github.com/") and " " not in pin.module_path
    assert H1.match(pin.module_h1)
    assert pin.module.version == f"v{pin.version}"
    assert pin.binaries and all(b.package.startswith(".") for b in pin.builds)
    assert set(pin.version_args) <= set(pin.binaries)
    assert "{version}" in pin.release and "{arch}" in pin.release


@pytest.mark.parametrize("pin", pins.TOOLS, ids=lambda p: p.name)
def test_every_release_file_has_a_pinned_sha256_for_every_arch(pin):
    # A digest listed next to the file on the release host proves nothing: it is pinned here.
    assert set(pin.sha256) == {a.value for a in Arch}
    for arch, digest in pin.sha256.items():
        assert digest is not None and SHA256.match(digest), f"{pin.name} {arch}"


def test_the_default_kernel_release_is_pinned():
    default = Config().kernel_version
    assert SHA256.match(pins.KERNEL_ORG_SHA256.get(default, "")), f"linux-{default}.tar.xz has no pinned sha256"


def test_release_digests_are_distinct():
    digests = [d for pin in pins.TOOLS for d in pin.sha256.values() if d]
    assert len(digests) == len(set(digests))


@pytest.mark.parametrize("pin", pins.TOOLS, ids=lambda p: p.name)
def test_release_path_names_the_version_and_arch(pin):
    for arch in Arch:
        path = pin.release_path(arch.value)
        assert pin.version in path and arch.value in path
        assert not path.startswith("/") and "{" not in path


def test_version_ldflags_carry_the_version_placeholder():
    # Without these the binaries would report "+unknown" instead of the pinned version.
    for pin in pins.TOOLS:
        if pin.name == "runc":
            continue  # runc's version is its module's VERSION file, embedded at build time
        for build in pin.builds:
            assert any("{version}" in flag for flag in build.ldflags), build.binary


def test_only_runc_uses_cgo():
    assert {b.binary for p in pins.TOOLS for b in p.builds if b.cgo} == {"runc"}


def test_libseccomp_is_pinned_for_every_arch():
    assert set(pins.LIBSECCOMP) == {a.value for a in Arch}
    for arch, deb in pins.LIBSECCOMP.items():
        assert SHA256.match(deb.sha256)
        assert deb.filename.endswith(f"_{arch}.deb") and deb.version in deb.filename
