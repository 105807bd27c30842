"""The SBOM of an initramfs: SPDX 2.3 JSON, read from the image's own bytes.

What is in it, and where each fact comes from (nothing is taken from a list we keep by hand):
- every Debian package dpkg installed (`var/lib/dpkg/status`: name, version, architecture,
  source package and its version), as a purl `pkg:deb/debian/NAME@VERSION?arch=...`;
- every Go binary (any ELF file carrying Go's build information) with its main module, the Go
  standard library it was built with, and every module linked into it (`dep` lines, with a
  replacement when there is one), as purls `pkg:golang/...`;
- the kernel: its release (the image's `usr/lib/modules/<release>`), the source it was built
  or unpacked from (URL and sha256) and the sha256 of its `.config`;
- every firmware file under `usr/lib/firmware` (SHA1 and SHA256 of the shipped, compressed
  bytes) and the Debian firmware packages they were taken from (the image's firmware.json).

Licenses: each Debian package's declared license comes from its copyright file, read at
build time by mkosi.postinst.chroot (the image keeps no /usr/share/doc) into `LICENSES`: the
License: short names of a machine-readable (DEP-5) file, mapped to SPDX ids (a name with no
SPDX id becomes a LicenseRef, declared in the document); a package whose file is free-form
says NOASSERTION. The firmware packages' copyright files come with the firmware tree
(firmware.py) and are read the same way. The kernel's is declared; Go modules and firmware
files say NOASSERTION. The document's time is SOURCE_DATE_EPOCH and its namespace a digest
of its content, so the same image gives the same SBOM.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from captainos import __version__
from captainos.core import pins
from captainos.core.config import Arch
from captainos.stages import cpio

SBOM_PATH = "usr/share/captainos/sbom.spdx.json"  # inside the image
FIRMWARE_REPORT = "usr/share/captainos/firmware.json"
TOOLS_MANIFEST = "usr/share/captainos/tools-manifest.json"
LICENSES = "usr/share/captainos/licenses.tsv"  # written by mkosi.postinst.chroot
GO_MAGIC = b"\xff Go buildinf:"
KERNEL_LICENSE = "GPL-2.0-only WITH Linux-syscall-note"


@dataclass(frozen=True)
class DebPackage:
    name: str
    version: str
    arch: str
    source: str
    source_version: str


@dataclass(frozen=True)
class GoBinary:
    path: str  # in the image, no leading slash
    go: str  # go1.26.8
    main: tuple[str, str]  # (module, version)
    deps: tuple[tuple[str, str], ...]  # (module, version) as linked (replacements applied)
    sha256: str = field(compare=False)


def parse_dpkg_status(text: str) -> list[DebPackage]:
    """The installed packages of a dpkg status file."""
    found = []
    for paragraph in text.split("\n\n"):
        fields: dict[str, str] = {}
        for line in paragraph.splitlines():
            if line[:1] not in (" ", "\t") and ":" in line:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
        if not fields.get("Package") or not fields.get("Status", "").endswith(" installed"):
            continue
        source, _, paren = fields.get("Source", fields["Package"]).partition(" (")
        found.append(DebPackage(fields["Package"], fields["Version"], fields.get("Architecture", ""),
                                source, paren.rstrip(")") or fields["Version"]))
    return sorted(found, key=lambda p: (p.name, p.arch))


def parse_licenses(text: str) -> dict[str, tuple[str, ...] | None]:
    """LICENSES: package -> the License: names of its DEP-5 copyright file (None: free form or
    no file)."""
    found: dict[str, tuple[str, ...] | None] = {}
    for line in text.splitlines():
        package, kind, names = ([*line.split("\t"), "", ""])[:3]
        if package:
            found[package] = tuple(n for n in names.split("|") if n) if kind == "dep5" else None
    return found


# Debian's DEP-5 short names (lower case) and their SPDX ids; "+" means "or later".
_SPDX_NAMES = {
    "apache-2.0": "Apache-2.0", "apache-2": "Apache-2.0", "artistic": "Artistic-1.0", "artistic-1.0": "Artistic-1.0",
    "artistic-2.0": "Artistic-2.0", "bsd-1-clause": "BSD-1-Clause", "bsd-2-clause": "BSD-2-Clause",
    "bsd-3-clause": "BSD-3-Clause", "bsd-4-clause": "BSD-4-Clause", "cc0-1.0": "CC0-1.0", "cc0": "CC0-1.0",
    "cc-by-sa-3.0": "CC-BY-SA-3.0", "cc-by-sa-4.0": "CC-BY-SA-4.0", "cc-by-3.0": "CC-BY-3.0",
    "cc-by-4.0": "CC-BY-4.0", "expat": "MIT", "mit": "MIT", "x11": "X11", "isc": "ISC", "zlib": "Zlib",
    "mpl-1.1": "MPL-1.1", "mpl-2.0": "MPL-2.0", "python": "Python-2.0", "python-2.0": "Python-2.0",
    "afl-2.1": "AFL-2.1", "fsfap": "FSFAP", "fsful": "FSFUL", "fsfullr": "FSFULLR", "beerware": "Beerware",
    "openssl": "OpenSSL", "curl": "curl", "bsl-1.0": "BSL-1.0", "boost-1.0": "BSL-1.0", "0bsd": "0BSD",
    "unlicense": "Unlicense", "wtfpl": "WTFPL", "ofl-1.1": "OFL-1.1", "perl": "Artistic-1.0-Perl OR GPL-1.0-or-later",
    "mit/x11": "MIT", "apache-2-llvm-exceptions": "Apache-2.0 WITH LLVM-exception",
}
_GNU = re.compile(r"^(a|l)?gpl-(\d)(?:\.(\d))?(\+)?$")
_GFDL = re.compile(r"^gfdl-(1\.[123])(\+)?$")
_EXCEPTIONS = {"bison": "Bison-exception-2.2", "autoconf": "Autoconf-exception-generic",
               "linux-syscall-note": "Linux-syscall-note", "gcc-3.1": "GCC-exception-3.1",
               "openssl": "openvpn-openssl-exception", "llvm": "LLVM-exception"}


def _spdx_license_id(name: str) -> str | None:
    """The SPDX id (or a small expression) of one Debian short name; None when it has none."""
    key = name.strip().lower()
    if key in _SPDX_NAMES:
        return _SPDX_NAMES[key]
    if gnu := _GNU.match(key):
        prefix, major, minor, later = gnu.groups()
        family = {"a": "AGPL", "l": "LGPL", None: "GPL"}[prefix]
        version = f"{major}.{minor or '0'}"
        known = {"GPL": ("1.0", "2.0", "3.0"), "LGPL": ("2.0", "2.1", "3.0"), "AGPL": ("1.0", "3.0")}[family]
        return f"{family}-{version}-{'or-later' if later else 'only'}" if version in known else None
    if gfdl := _GFDL.match(key):
        return f"GFDL-{gfdl.group(1)}-{'or-later' if gfdl.group(2) else 'only'}"
    return None


def _term(text: str) -> str | None:
    """One license, maybe "NAME with EXCEPTION exception", as SPDX; None when it has no id."""
    base, _, exception = text.partition(" with ")
    spdx = _spdx_license_id(base)
    if spdx is None or (exception and " " in spdx):
        return None
    if not exception:
        return spdx
    found = _EXCEPTIONS.get(exception.strip().lower().removesuffix(" exception").strip())
    return f"{spdx} WITH {found}" if found else None


def license_expression(value: str) -> str | None:
    """A License: value of a DEP-5 file (`GPL-2+ or Artistic`, `A or B, and C`, `X with Y
    exception`) as an SPDX expression; None when a part has no SPDX id, or when "and" and "or"
    meet without the commas that say how they group."""
    groups = []
    for group in re.split(r",\s*(?=(?:and|or)\s)", value.strip()):
        group = group.strip()
        operator = ""
        if group.lower().startswith(("and ", "or ")):
            operator, _, group = group.partition(" ")
            operator = operator.upper()
        words = re.split(r"\s+(and|or)\s+", group, flags=re.I)
        terms, joins = words[::2], {w.lower() for w in words[1::2]}
        if len(joins) > 1:
            return None
        spdx = [t for t in map(_term, terms) if t is not None]
        if len(spdx) != len(terms):
            return None
        joined = f" {joins.pop().upper()} ".join(f"({t})" if " OR " in t else t for t in spdx) if joins else spdx[0]
        groups.append((operator, joined))
    expression = groups[0][1]  # re.split gives at least one group
    for operator, joined in groups[1:]:
        expression = f"({expression}) {operator or 'AND'} ({joined})"
    return expression


def _extracted_licenses(refs: _Ids) -> list[dict[str, str]]:
    """hasExtractedLicensingInfos for every LicenseRef refs made (SPDX requires each one used
    to be declared)."""
    return [{"licenseId": ref, "name": value,
             "extractedText": f"The license Debian copyright files name {value!r}; its text is in the "
                              "copyright file of each package that declares it (the image keeps none)."}
            for (_, value), ref in sorted(refs.made.items(), key=lambda item: item[1])]


def declared_license(names: tuple[str, ...] | None, refs: _Ids) -> str:
    """A package's declared license: every License: value of its copyright file, ANDed (each
    covers some of its files); NOASSERTION when the file is not machine-readable."""
    if not names:
        return "NOASSERTION"
    parts = []
    for value in names:
        expression = license_expression(value) or refs("deb", value)  # LicenseRef-deb-...
        parts.append(f"({expression})" if " " in expression and len(names) > 1 else expression)
    return " AND ".join(parts)


def _uvarint(data: bytes, offset: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[offset]
        offset += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, offset
        shift += 7


def go_buildinfo(data: bytes) -> tuple[str, str] | None:
    """(Go version, module info text) of a Go 1.18+ binary, or None. The header is 32 bytes
    (magic, pointer size, flags); with flag 2 the two strings follow inline, each prefixed by
    its length as a uvarint, the module info wrapped in 16-byte sentinels."""
    start = data.find(GO_MAGIC)
    while start >= 0:
        # The section is 16-byte aligned (as Go's own reader expects); the magic elsewhere is
        # only a string constant, e.g. in a program that reads build info itself.
        if start % 16 == 0 and len(data) >= start + 32 and data[start + 15] & 0x2:
            try:
                length, offset = _uvarint(data, start + 32)
                version = data[offset:offset + length].decode()
                length, offset = _uvarint(data, offset + length)
                modinfo = data[offset:offset + length]
                if len(modinfo) >= 33 and modinfo[-17] == ord("\n"):
                    modinfo = modinfo[16:-16]
                if version.startswith("go"):
                    return version, modinfo.decode()
            except (IndexError, UnicodeDecodeError):
                pass  # not build info after all: keep looking
        start = data.find(GO_MAGIC, start + 1)
    return None


def parse_modinfo(text: str) -> tuple[tuple[str, str], tuple[tuple[str, str], ...]]:
    """(main module, deps) from build info lines: mod, dep, and `=>` replacing the line before."""
    main = ("", "")
    deps: list[tuple[str, str]] = []
    for line in text.splitlines():
        words = line.split("\t")
        if words[0] == "mod" and len(words) >= 3:
            main = (words[1], words[2])
        elif words[0] == "dep" and len(words) >= 3:
            deps.append((words[1], words[2]))
        elif words[0] == "=>" and len(words) >= 3 and deps:
            deps[-1] = (words[1], words[2])
    return main, tuple(sorted(deps))


@dataclass
class Contents:
    """What the SBOM is made from: the files of the image, read once."""

    arch: Arch
    debs: list[DebPackage] = field(default_factory=list)
    go: list[GoBinary] = field(default_factory=list)
    kernel_release: str = ""
    firmware: dict[str, bytes] = field(default_factory=dict)  # path in the image -> bytes
    firmware_report: dict[str, Any] = field(default_factory=dict)
    tools_manifest: dict[str, Any] = field(default_factory=dict)
    licenses: dict[str, tuple[str, ...] | None] = field(default_factory=dict)  # package -> names (None: no DEP-5)

    def main_version(self, binary: GoBinary) -> str:
        """The main module's version: the build info's, or, for a binary built in a source tree
        ("(devel)"), the version the tools manifest in the image records for that file."""
        module, version = binary.main
        if version != "(devel)":
            return version
        for component in self.tools_manifest.get("components", {}).values():
            paths = {b.get("path") for b in component.get("binaries", {}).values()}
            path, _, pinned = str(component.get("module", "")).partition("@")
            if f"/{binary.path}" in paths and path == module and pinned:
                return pinned
        return version


def read_image(members: Iterable[cpio.Member], arch: Arch) -> Contents:
    found = Contents(arch)
    releases = set()
    for member in members:
        name = member.name
        if name.startswith("usr/lib/modules/") and name.count("/") == 3 and not member.is_file:
            releases.add(name.split("/")[3])
        if not member.is_file:
            continue
        if name == "var/lib/dpkg/status":
            found.debs = parse_dpkg_status(member.data.decode())
        elif name == FIRMWARE_REPORT:
            found.firmware_report = json.loads(member.data)
        elif name == TOOLS_MANIFEST:
            found.tools_manifest = json.loads(member.data)
        elif name == LICENSES:
            found.licenses = parse_licenses(member.data.decode(errors="replace"))
        elif name.startswith("usr/lib/firmware/"):
            found.firmware[name] = member.data
        elif member.data[:4] == b"\x7fELF" and (info := go_buildinfo(member.data)):
            main, deps = parse_modinfo(info[1])
            found.go.append(GoBinary(name, info[0], main, deps, hashlib.sha256(member.data).hexdigest()))
    found.go.sort(key=lambda b: b.path)
    found.kernel_release = ",".join(sorted(releases))
    return found


class _Ids:
    """SPDX ids from names: only [A-Za-z0-9.-] may appear, so `libsigc++` and `libsigc--`, or
    `rtl_nic/x` and `rtl-nic/x`, would meet; each id is made once per element, and a second
    element that would get the same one gets a suffix of its own words' digest."""

    def __init__(self, prefix: str = "SPDXRef-") -> None:
        self.prefix = prefix  # "LicenseRef-" for license ids
        self.made: dict[tuple[str, ...], str] = {}
        self.used: set[str] = set()

    def __call__(self, kind: str, *words: str) -> str:
        key = (kind, *words)
        if key not in self.made:
            spdx_id = self.prefix + re.sub(r"[^A-Za-z0-9.-]+", "-", "-".join(key)).strip("-")
            if spdx_id in self.used:
                spdx_id += "-" + hashlib.sha256("\0".join(key).encode()).hexdigest()[:12]
            self.made[key] = spdx_id
            self.used.add(spdx_id)
        return self.made[key]


def _package(spdx_id: str, name: str, version: str, *, purl: str | None = None, **extra: Any) -> dict[str, Any]:
    package: dict[str, Any] = {"SPDXID": spdx_id, "name": name, "versionInfo": version,
                               "downloadLocation": "NOASSERTION", "filesAnalyzed": False,
                               "licenseConcluded": "NOASSERTION", "licenseDeclared": "NOASSERTION",
                               "copyrightText": "NOASSERTION"}
    if purl:
        package["externalRefs"] = [{"referenceCategory": "PACKAGE-MANAGER", "referenceType": "purl",
                                    "referenceLocator": purl}]
    package.update(extra)
    return package


def document(contents: Contents, kernel_info: dict[str, Any], kernel_config_sha256: str) -> dict[str, Any]:
    """The SPDX 2.3 document of an image's contents and the kernel it boots with."""
    arch = contents.arch
    _spdx_id = _Ids()
    root = "SPDXRef-captainos"
    packages: list[dict[str, Any]] = []
    relations: list[tuple[str, str, str]] = [("SPDXRef-DOCUMENT", "DESCRIBES", root)]
    refs = _Ids("LicenseRef-")
    for deb in contents.debs:
        spdx_id = _spdx_id("deb", deb.name, deb.arch)
        packages.append(_package(
            spdx_id, deb.name, deb.version, purl=f"pkg:deb/debian/{deb.name}@{deb.version}?arch={deb.arch}",
            supplier="Organization: Debian", licenseDeclared=declared_license(contents.licenses.get(deb.name), refs),
            sourceInfo=f"built from the Debian source package {deb.source} {deb.source_version}"))
        relations.append((root, "CONTAINS", spdx_id))
    modules: dict[tuple[str, str], str] = {}
    for binary in contents.go:
        bin_id = _spdx_id("gobin", binary.path)
        version = contents.main_version(binary)
        packages.append(_package(
            bin_id, binary.main[0] or binary.path, version or "NOASSERTION",
            purl=f"pkg:golang/{binary.main[0]}@{version}" if binary.main[0] and version != "(devel)" else None,
            packageFileName=f"/{binary.path}", checksums=[{"algorithm": "SHA256", "checksumValue": binary.sha256}],
            comment=f"Go binary /{binary.path}, built with {binary.go}"))
        relations.append((root, "CONTAINS", bin_id))
        for module in (("stdlib", binary.go), *binary.deps):
            if module not in modules:
                modules[module] = _spdx_id("gomod", *module)
                packages.append(_package(modules[module], module[0], module[1],
                                         purl=f"pkg:golang/{module[0]}@{module[1]}"))
            relations.append((bin_id, "CONTAINS", modules[module]))
    kernel_id = "SPDXRef-kernel"
    url = str(kernel_info.get("url") or "")
    packages.append(_package(
        kernel_id, "linux", contents.kernel_release or "NOASSERTION",
        downloadLocation=url if re.match(r"^https?://", url) else "NOASSERTION",  # a local tree has no URL
        licenseDeclared=KERNEL_LICENSE,
        sourceInfo=f"{kernel_info.get('source')} {kernel_info.get('source_version')}, source sha256 "
                   f"{kernel_info.get('source_id')}",
        comment=f"kernel .config sha256 {kernel_config_sha256}"))
    relations.append((root, "CONTAINS", kernel_id))
    firmware_packages = contents.firmware_report.get("packages", {})
    origin = {f["name"]: f["package"] for f in contents.firmware_report.get("files", [])}
    for name, version in sorted(firmware_packages.items()):
        spdx_id = _spdx_id("firmware-deb", name)
        packages.append(_package(spdx_id, name, version, purl=f"pkg:deb/debian/{name}@{version}?arch=all",
                                 supplier="Organization: Debian",
                                 licenseDeclared=declared_license(contents.licenses.get(name), refs),
                                 comment="firmware files are taken from it (not installed with dpkg)"))
        relations.append((root, "CONTAINS", spdx_id))
    files: list[dict[str, Any]] = []
    sha1s = []
    for path, data in sorted(contents.firmware.items()):
        spdx_id = _spdx_id("firmware", path.removeprefix("usr/lib/firmware/"))
        plain = path.removeprefix("usr/lib/firmware/").removesuffix(".xz")
        sha1s.append(hashlib.sha1(data).hexdigest())
        files.append({"SPDXID": spdx_id, "fileName": f"./{path}", "fileTypes": ["BINARY"],
                      "checksums": [{"algorithm": "SHA1", "checksumValue": sha1s[-1]},
                                    {"algorithm": "SHA256", "checksumValue": hashlib.sha256(data).hexdigest()}],
                      "licenseConcluded": "NOASSERTION", "copyrightText": "NOASSERTION",
                      **({"comment": f"from {origin[plain]}"} if plain in origin else {})})
        relations.append((root, "CONTAINS", spdx_id))
        if plain in origin:
            relations.append((spdx_id, "GENERATED_FROM", _spdx_id("firmware-deb", origin[plain])))
    root_package = _package(root, "CaptainOS", __version__, primaryPackagePurpose="OPERATING-SYSTEM",
                            filesAnalyzed=bool(files),
                            comment=f"the {arch.value} initramfs; the files listed are its firmware")
    if files:
        root_package["packageVerificationCode"] = {
            "packageVerificationCodeValue": hashlib.sha1("".join(sorted(sha1s)).encode()).hexdigest()}
    body = {"packages": [root_package, *packages], "files": files,
            **({"hasExtractedLicensingInfos": _extracted_licenses(refs)} if refs.made else {}),
            "relationships": [{"spdxElementId": a, "relationshipType": kind, "relatedSpdxElement": b}
                              for a, kind, b in relations]}
    digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    return {"spdxVersion": "SPDX-2.3", "dataLicense": "CC0-1.0", "SPDXID": "SPDXRef-DOCUMENT",
            "name": f"captainos-{__version__}-{arch.value}",
            "documentNamespace": f"https://spdx.org/spdxdocs/captainos-{__version__}-{arch.value}-{digest}",
            "creationInfo": {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(pins.SOURCE_DATE_EPOCH)),
                             "creators": [f"Tool: captainos-{__version__}"]},
            **body}


def lock_list(doc: dict[str, Any]) -> str:
    """The Debian packages a build used, one `deb NAME VERSION ARCH` line each (the image's and
    the firmware packages), and the kernel's source (`kernel FILE sha256 DIGEST`), sorted: two
    builds on two machines are compared by this file."""
    lines = []
    for package in doc["packages"]:
        purl = next((r["referenceLocator"] for r in package.get("externalRefs", [])), "")
        if purl.startswith("pkg:deb/"):
            lines.append(f"deb {package['name']} {package['versionInfo']} {purl.rsplit('arch=', 1)[1]}")
        elif package["SPDXID"] == "SPDXRef-kernel":
            digest = package.get("sourceInfo", "").rsplit(" ", 1)[-1]
            where = package["downloadLocation"]
            source = where.rsplit("/", 1)[-1] if where != "NOASSERTION" else "local-tree"
            lines.append(f"kernel {source} {'sha256' if where != 'NOASSERTION' else 'id'} {digest}")
    return "".join(f"{line}\n" for line in sorted(set(lines)))


def write(initramfs_segments: bytes, arch: Arch, kernel_entry: Path) -> tuple[bytes, str]:
    """(the SBOM as JSON bytes, the lock list) of the decompressed segments of an initramfs."""
    contents = read_image(cpio.members(initramfs_segments), arch)
    info = json.loads((kernel_entry / "kernel.json").read_text())
    config_sha = hashlib.sha256((kernel_entry / "config").read_bytes()).hexdigest()
    doc = document(contents, info, config_sha)
    return (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode(), lock_list(doc)
