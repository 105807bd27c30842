"""The SBOM's readers (dpkg status, Go build info) and the document, validated by spdx-tools.
Against a real image (dpkg-query and `go version -m` as the second opinion):
tests/integration/test_image.py."""

from __future__ import annotations

import json
import re

import pytest

from captainos.core.config import Arch
from captainos.stages import cpio, sbom

STATUS = """Package: libc6
Status: install ok installed
Architecture: amd64
Source: glibc (2.41-12)
Version: 2.41-12+deb13u1
Description: GNU C Library
 continued line: Source: not-a-field

Package: removed-one
Status: deinstall ok config-files
Architecture: amd64
Version: 1.0

Package: bash
Status: install ok installed
Architecture: amd64
Version: 5.2.37-2+b5
"""

MODINFO = ("path\tgithub.com/example/tool/cmd/tool\n"
           "mod\tgithub.com/example/tool\t(devel)\t\n"
           "dep\tgithub.com/a/b\tv1.2.3\th1:xxx=\n"
           "dep\tgithub.com/c/d\tv0.1.0\th1:yyy=\n"
           "=>\tgithub.com/fork/d\tv0.1.1\th1:zzz=\n"
           "build\t-trimpath=true\n")


def uvarint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    return bytes([*out, value])


def go_binary(version: str = "go1.26.8", modinfo: str = MODINFO) -> bytes:
    """An ELF-looking blob with Go's build info as Go 1.18+ lays it out."""
    wrapped = b"\x30" * 16 + modinfo.encode() + b"\x31" * 16
    assert wrapped[-17] == ord("\n")
    header = sbom.GO_MAGIC + bytes([8, 2]) + b"\0" * 16
    # The section is 16-byte aligned; a copy of the magic as a string constant before it is not.
    prefix = b"\x7fELF" + b"\0" * 9 + sbom.GO_MAGIC + b"\0" * 3  # an unaligned decoy at 13
    prefix += b"\0" * (-len(prefix) % 16)
    return (prefix + header + uvarint(len(version)) + version.encode()
            + uvarint(len(wrapped)) + wrapped + b"\0" * 64)


def image(members: list[tuple[str, int, bytes]]) -> bytes:
    return cpio.write(members)


FIRMWARE_REPORT = {"packages": {"firmware-realtek": "20250410-2"},
                   "files": [{"name": "rtl_nic/rtl8168h-2.fw", "package": "firmware-realtek"}]}
TOOLS_MANIFEST = {"components": {"tool": {"module": "github.com/example/tool@v9.9.9",
                                          "binaries": {"tool": {"path": "/usr/bin/tool"}}}}}


# What mkosi.postinst.chroot writes: bash's copyright file is DEP-5, libc6's free-form; the
# firmware package (not installed with dpkg) comes last.
LICENSES = ("bash\tdep5\tGPL-3+|GPL-3+ with Bison exception|public-domain|BSD-4-clause-UC and MIT-like\n"
            "libc6\tother\t\n"
            "firmware-realtek\tdep5\tnon-free|GPL-2+\n")


@pytest.fixture
def contents() -> sbom.Contents:
    blob = image([
        ("var/lib/dpkg/status", 0o100644, STATUS.encode()),
        ("usr/lib/modules", 0o40755, b""),
        ("usr/lib/modules/6.12.117+deb13-amd64", 0o40755, b""),
        ("usr/lib/modules/6.12.117+deb13-amd64/modules.dep", 0o100644, b""),
        ("usr/bin/tool", 0o100755, go_binary()),
        ("usr/bin/not-go", 0o100755, b"\x7fELF" + b"\0" * 200),
        ("usr/lib/firmware/rtl_nic/rtl8168h-2.fw.xz", 0o100644, b"fw-bytes"),
        (sbom.FIRMWARE_REPORT, 0o100644, json.dumps(FIRMWARE_REPORT).encode()),
        (sbom.TOOLS_MANIFEST, 0o100644, json.dumps(TOOLS_MANIFEST).encode()),
        (sbom.LICENSES, 0o100644, LICENSES.encode()),
    ])
    return sbom.read_image(cpio.members(blob), Arch.AMD64)


def test_dpkg_status_gives_installed_packages_with_their_source():
    packages = sbom.parse_dpkg_status(STATUS)
    assert packages == [sbom.DebPackage("bash", "5.2.37-2+b5", "amd64", "bash", "5.2.37-2+b5"),
                        sbom.DebPackage("libc6", "2.41-12+deb13u1", "amd64", "glibc", "2.41-12")]


def test_go_build_info_is_read_with_replacements_applied():
    version, modinfo = sbom.go_buildinfo(go_binary())
    assert version == "go1.26.8" and modinfo == MODINFO
    main, deps = sbom.parse_modinfo(modinfo)
    assert main == ("github.com/example/tool", "(devel)")
    assert deps == (("github.com/a/b", "v1.2.3"), ("github.com/fork/d", "v0.1.1"))
    assert sbom.go_buildinfo(b"\x7fELF" + b"\0" * 100) is None
    # An aligned magic followed by garbage is "not Go", never a traceback.
    assert sbom.go_buildinfo(b"\0" * 16 + sbom.GO_MAGIC + bytes([8, 2]) + b"\xff" * 40) is None


def test_spdx_ids_stay_unique_when_names_differ_only_in_characters_spdx_refuses():
    ids = sbom._Ids()
    made = {ids("deb", "libsigc++-2.0-0v5", "amd64"), ids("deb", "libsigc--2.0-0v5", "amd64"),
            ids("firmware", "rtl_nic/x"), ids("firmware", "rtl-nic/x")}
    assert len(made) == 4 and all(re.fullmatch(r"SPDXRef-[A-Za-z0-9.-]+", i) for i in made)
    assert ids("deb", "libsigc++-2.0-0v5", "amd64") in made  # the same element, the same id


def test_the_contents_come_from_the_image(contents):
    assert [d.name for d in contents.debs] == ["bash", "libc6"]
    assert [b.path for b in contents.go] == ["usr/bin/tool"]
    assert contents.kernel_release == "6.12.117+deb13-amd64"
    assert list(contents.firmware) == ["usr/lib/firmware/rtl_nic/rtl8168h-2.fw.xz"]
    # "(devel)" (built in a source tree): the version the tools manifest records for that file
    assert contents.main_version(contents.go[0]) == "v9.9.9"


def document(contents: sbom.Contents) -> dict:
    return sbom.document(contents, {"url": "http://deb.debian.org/x.deb", "source": "debian-image",
                                    "source_version": "6.12.117-1", "source_id": "ab" * 32}, "cd" * 32)


def validate(doc: dict, tmp_path) -> list[str]:
    from spdx_tools.spdx.parser.parse_anything import parse_file
    from spdx_tools.spdx.validation.document_validator import validate_full_spdx_document

    path = tmp_path / "sbom.spdx.json"
    path.write_text(json.dumps(doc))
    return [m.validation_message for m in validate_full_spdx_document(parse_file(str(path)))]


def test_the_document_is_valid_spdx_2_3_and_says_what_is_inside(contents, tmp_path):
    doc = document(contents)
    assert validate(doc, tmp_path) == []
    by_id = {p["SPDXID"]: p for p in doc["packages"]}
    purls = sorted(p["externalRefs"][0]["referenceLocator"] for p in doc["packages"] if "externalRefs" in p)
    assert purls == ["pkg:deb/debian/bash@5.2.37-2+b5?arch=amd64",
                     "pkg:deb/debian/firmware-realtek@20250410-2?arch=all",
                     "pkg:deb/debian/libc6@2.41-12+deb13u1?arch=amd64", "pkg:golang/github.com/a/b@v1.2.3",
                     "pkg:golang/github.com/example/tool@v9.9.9", "pkg:golang/github.com/fork/d@v0.1.1",
                     "pkg:golang/stdlib@go1.26.8"]
    assert "glibc 2.41-12" in by_id["SPDXRef-deb-libc6-amd64"]["sourceInfo"]
    kernel = by_id["SPDXRef-kernel"]
    assert kernel["versionInfo"] == "6.12.117+deb13-amd64" and kernel["licenseDeclared"] == sbom.KERNEL_LICENSE
    assert "ab" * 32 in kernel["sourceInfo"] and "cd" * 32 in kernel["comment"]
    (firmware,) = doc["files"]
    assert firmware["fileName"] == "./usr/lib/firmware/rtl_nic/rtl8168h-2.fw.xz"
    contains = {(r["spdxElementId"], r["relatedSpdxElement"]) for r in doc["relationships"]
                if r["relationshipType"] == "CONTAINS"}
    tool = "SPDXRef-gobin-usr-bin-tool"
    assert {(tool, "SPDXRef-gomod-github.com-a-b-v1.2.3"), (tool, "SPDXRef-gomod-stdlib-go1.26.8")} <= contains
    assert ("SPDXRef-captainos", "SPDXRef-deb-bash-amd64") in contains


def test_packages_declare_the_licenses_of_their_dep5_copyright_files(contents, tmp_path):
    doc = document(contents)
    by_id = {p["SPDXID"]: p for p in doc["packages"]}
    bash = by_id["SPDXRef-deb-bash-amd64"]["licenseDeclared"]
    assert bash == ("GPL-3.0-or-later AND (GPL-3.0-or-later WITH Bison-exception-2.2) AND LicenseRef-deb-public-domain "
                    "AND LicenseRef-deb-BSD-4-clause-UC-and-MIT-like")
    assert by_id["SPDXRef-deb-libc6-amd64"]["licenseDeclared"] == "NOASSERTION"  # free-form copyright file
    assert by_id["SPDXRef-firmware-deb-firmware-realtek"]["licenseDeclared"] == \
        "LicenseRef-deb-non-free AND GPL-2.0-or-later"
    assert [e["licenseId"] for e in doc["hasExtractedLicensingInfos"]] == [
        "LicenseRef-deb-BSD-4-clause-UC-and-MIT-like", "LicenseRef-deb-non-free", "LicenseRef-deb-public-domain"]
    assert validate(doc, tmp_path) == []  # every LicenseRef declared, every id on SPDX's list


@pytest.mark.parametrize(("value", "spdx"), [
    ("GPL-2+", "GPL-2.0-or-later"), ("GPL-2", "GPL-2.0-only"), ("GPL-2.0+", "GPL-2.0-or-later"),
    ("LGPL-2.1+", "LGPL-2.1-or-later"), ("LGPL-2", "LGPL-2.0-only"), ("AGPL-3+", "AGPL-3.0-or-later"),
    ("Expat", "MIT"), ("BSD-3-clause", "BSD-3-Clause"), ("bsd-3-clause", "BSD-3-Clause"), ("Zlib", "Zlib"),
    ("GFDL-1.3+", "GFDL-1.3-or-later"), ("Artistic or GPL-1+", "Artistic-1.0 OR GPL-1.0-or-later"),
    ("GPL-3+ with Bison exception", "GPL-3.0-or-later WITH Bison-exception-2.2"),
    ("GPL-2 with Linux-syscall-note exception", "GPL-2.0-only WITH Linux-syscall-note"),
    ("GPL-2+ or Perl", "GPL-2.0-or-later OR (Artistic-1.0-Perl OR GPL-1.0-or-later)"),
    ("GPL-2+ or Artistic-2.0, and BSD-3-clause", "(GPL-2.0-or-later OR Artistic-2.0) AND (BSD-3-Clause)"),
    ("LGPL-3+ or GPL-2+", "LGPL-3.0-or-later OR GPL-2.0-or-later"),
    # No SPDX id (a LicenseRef then): no such license, no version, an unknown exception, and/or
    # without the commas that say how they group.
    ("public-domain", None), ("GPL", None), ("GPL-4+", None), ("GPL-2+ with Foo exception", None),
    ("MIT and BSD-3-clause or ISC", None), ("", None)])
def test_dep5_license_values_become_spdx_expressions(value, spdx):
    assert sbom.license_expression(value) == spdx


def test_the_same_contents_give_the_same_bytes(contents):
    import time

    from captainos.core import pins

    assert json.dumps(document(contents)) == json.dumps(document(contents))
    created = document(contents)["creationInfo"]["created"]
    assert created == time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(pins.SOURCE_DATE_EPOCH))


def test_the_validator_is_not_a_rubber_stamp(contents, tmp_path):
    doc = document(contents)
    doc["packages"][1]["SPDXID"] = "SPDXRef-bad_id"  # underscores are not allowed in an SPDX id
    messages = validate(doc, tmp_path)
    assert any("SPDXRef-bad_id" in m for m in messages), messages


def test_the_lock_list_names_every_debian_package_and_the_kernel_source(contents):
    assert sbom.lock_list(document(contents)) == (
        "deb bash 5.2.37-2+b5 amd64\n"
        "deb firmware-realtek 20250410-2 all\n"
        "deb libc6 2.41-12+deb13u1 amd64\n"
        f"kernel x.deb sha256 {'ab' * 32}\n")
