"""The real image: built by mkosi with the test profile, booted in QEMU (TCG).

The guest's self-test (image/mkosi.profiles/test) prints `CAPTAINOS-SELFTEST: ...` lines on
the serial console and powers off; every assertion below is on what it printed, and every
failure message carries the serial tail (qemu.Guest does that).
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from captainos.core import log
from captainos.core.config import REPO, Accel, Arch, Config
from captainos.core.run import Runner
from captainos.lab import qemu
from captainos.stages import cpio, firmware, image

pytestmark = pytest.mark.integration

VERDICT = r"CAPTAINOS-SELFTEST: (PASS|FAIL.*)"
BOOT_TIMEOUT = 900  # TCG on a shared two-core host; a quiet host needs about 100 s
MAC = qemu.DEFAULT_MAC
SECRET = "Sup3rS3cretPassw0rd"


@pytest.fixture(scope="module")
def kernel(request: pytest.FixtureRequest) -> Path:
    """The kernel entry to boot: the session's, or CAPTAINOS_KERNEL_ENTRY (any entry dir with
    vmlinuz, modules/ and kernel.json) to test the image against another kernel."""
    override = os.environ.get("CAPTAINOS_KERNEL_ENTRY")
    return Path(override) if override else Path(request.getfixturevalue("kernel_entry"))


@pytest.fixture(scope="module")
def tools_entry(lab_cfg: Config) -> Path:
    from captainos.stages import pipeline

    return pipeline.build_tools(lab_cfg)


@pytest.fixture(scope="module")
def initramfs(lab_cfg: Config, kernel: Path, tools_entry: Path) -> Path:
    entry = image.build(lab_cfg, Runner(), kernel, tools_entry)
    size = (entry / image.OUTPUT).stat().st_size
    log.info(f"initramfs: {log.human_bytes(size)} ({entry})")
    return entry / image.OUTPUT


@pytest.fixture(scope="module")
def unpacked(initramfs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The image's files on disk, both segments, as the kernel unpacks them."""
    root = tmp_path_factory.mktemp("root")
    for member in cpio.members(cpio.decompress(initramfs)):
        path = root / member.name
        kind = member.mode & 0o170000
        if kind == 0o040000:
            path.mkdir(parents=True, exist_ok=True)
        elif kind == 0o120000:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.unlink(missing_ok=True)
            path.symlink_to(member.data.decode())
        elif member.is_file:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(member.data)
            path.chmod(member.mode & 0o7777)
    return root


def inside(root: Path, path: Path) -> Path | None:
    """path (absolute inside the image) with the image's own links followed, or None."""
    current = root
    for part in path.relative_to("/").parts:
        current = current / part
        for _ in range(16):
            if not current.is_symlink():
                break
            target = Path(os.readlink(current))
            current = root / target.relative_to("/") if target.is_absolute() else current.parent / target
    return current if current.exists() else None


def test_os_release_carries_the_release_version(unpacked: Path) -> None:
    """The image says which CaptainOS it is, the version `captainos --version` prints."""
    from captainos import __version__

    fields = dict(line.split("=", 1) for line in (unpacked / "usr/lib/os-release").read_text().splitlines() if line)
    assert fields["IMAGE_VERSION"].strip('"') == __version__ == fields["VERSION_ID"].strip('"')
    printed = subprocess.run([sys.executable, str(REPO / "build.py"), "--version"], capture_output=True, text=True)
    assert printed.stdout.strip() == f"captainos {__version__}"


def sbom_of(initramfs: Path) -> dict:
    return json.loads((initramfs.parent / image.SBOM).read_text())


def test_units_for_code_the_kernel_has_built_in_are_masked(unpacked: Path) -> None:
    """systemd's own view of the built image (not our tree): the modprobe@ instances that
    sysinit.target waits for (drm for logind, fuse and configfs for their mounts) are masked;
    mkosi's preset-all must not have removed the masks. The rest stays as systemd ships it."""
    def state(unit: str) -> str:
        return subprocess.run(["systemctl", f"--root={unpacked}", "is-enabled", unit], capture_output=True,
                              text=True, check=False).stdout.strip()
    for name in ("drm", "fuse", "configfs"):
        assert state(f"modprobe@{name}.service") == "masked", name
    assert state("systemd-networkd.service") == "enabled"
    assert state("captainos-reboot-guard.socket") == "enabled"  # actions' reboot(2) is deferred
    guard = unpacked / "usr/lib/captainos/reboot-guard"  # from the tools segment
    assert guard.is_file() and guard.stat().st_mode & 0o111
    assert state("modprobe@loop.service") != "masked"
    for name in ("kmod-static-nodes", "systemd-tmpfiles-setup-dev-early", "systemd-journal-flush",
                 "systemd-random-seed", "systemd-networkd-persistent-storage", "systemd-machine-id-commit"):
        assert state(f"{name}.service") == "masked", name


def test_the_static_device_nodes_are_written_at_build_time(unpacked: Path) -> None:
    """kmod-static-nodes is masked; the image carries its list instead, made from the image's
    own modules.devname: one tmpfiles line per node (and its directory), numbers as listed."""
    devnames = list(unpacked.glob("usr/lib/modules/*/modules.devname"))
    assert len(devnames) == 1
    entries = [line.split() for line in devnames[0].read_text().splitlines() if line and not line.startswith("#")]
    assert entries, "Debian's kernel has modular devices (tun, loop): the list cannot be empty"
    lines = (unpacked / "usr/lib/tmpfiles.d/captainos-static-nodes.conf").read_text().splitlines()
    for _module, devname, numbers in entries:
        assert f"{numbers[0]}! /dev/{devname} 0600 - - - {numbers[1:]}" in lines, devname
        if "/" in devname:
            assert f"d /dev/{devname.rsplit('/', 1)[0]} 0755 - - -" in lines, devname


def test_modules_to_load_at_boot_are_only_those_not_built_in(unpacked: Path) -> None:
    """captainos.conf keeps the modules the image's kernel does not have built in; with none
    left it is gone (systemd-modules-load then skips), and so is kmod's comment-only list."""
    source = (REPO / "image/mkosi.extra/usr/lib/modules-load.d/captainos.conf").read_text().split("\n")
    wanted = [line for line in source if line and not line.startswith("#")]
    builtin_list = next(unpacked.glob("usr/lib/modules/*/modules.builtin")).read_text().split()
    builtin = {Path(path).name.removesuffix(".ko").replace("-", "_") for path in builtin_list}
    loadable = [name for name in wanted if name not in builtin]
    conf = unpacked / "usr/lib/modules-load.d/captainos.conf"
    if loadable:
        assert [line for line in conf.read_text().splitlines() if not line.startswith("#")] == loadable
    else:
        assert not conf.exists()
    assert not (unpacked / "etc/modules-load.d/modules.conf").exists()


def test_only_the_generators_a_ram_os_uses_are_left(unpacked: Path) -> None:
    generators = {p.name for p in (unpacked / "usr/lib/systemd/system-generators").iterdir()}
    assert {"systemd-debug-generator", "systemd-fstab-generator", "systemd-getty-generator",
            "systemd-run-generator", "captainos-cmdline"} <= generators
    assert not generators & {"systemd-gpt-auto-generator", "systemd-sysv-generator", "systemd-tpm2-generator",
                             "systemd-hibernate-resume-generator", "systemd-rc-local-generator",
                             "systemd-system-update-generator", "systemd-ssh-generator"}


def test_the_sbom_passes_the_spdx_validator_and_is_in_the_image(initramfs: Path, unpacked: Path) -> None:
    path = initramfs.parent / image.SBOM
    # pyspdxtools, the SPDX project's validator (spdx-tools from PyPI), run as its own program
    result = subprocess.run([sys.executable, "-m", "spdx_tools.spdx.clitools.pyspdxtools", "-i", str(path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr
    assert (unpacked / "usr/share/captainos/sbom.spdx.json").read_bytes() == path.read_bytes()


def test_the_sbom_lists_what_dpkg_says_is_installed(initramfs: Path, unpacked: Path) -> None:
    """dpkg-query on the image's own database is the second opinion: nothing missing, nothing invented."""
    query = subprocess.run(["dpkg-query", f"--admindir={unpacked / 'var/lib/dpkg'}", "-W", "-f",
                            "${Package} ${Version} ${Architecture} ${db:Status-Status}\n"],
                           capture_output=True, text=True, check=True).stdout
    installed = {tuple(line.split()[:3]) for line in query.splitlines() if line.endswith(" installed")}
    listed = {(p["name"], p["versionInfo"], p["externalRefs"][0]["referenceLocator"].rsplit("=", 1)[1])
              for p in sbom_of(initramfs)["packages"] if p["SPDXID"].startswith("SPDXRef-deb-")}
    assert len(installed) > 100
    assert listed == installed
    # The lock list (out/packages-<arch>.lock) says the same, plus the firmware packages.
    firmware = json.loads((unpacked / "usr/share/captainos/firmware.json").read_text())["packages"]
    lock = (initramfs.parent / image.LOCK).read_text().splitlines()
    assert {tuple(line.split()[1:]) for line in lock if line.startswith("deb ")} == installed | {
        (name, version, "all") for name, version in firmware.items()}


def test_every_package_with_a_machine_readable_copyright_file_declares_its_license(initramfs: Path,
                                                                                  unpacked: Path) -> None:
    """licenses.tsv (written from the copyright files at build time) lists every installed
    package and every firmware package the build took files from; exactly those whose file is
    free-form say NOASSERTION, and they are few."""
    from captainos.stages import firmware, sbom
    licenses = sbom.parse_licenses((unpacked / sbom.LICENSES).read_text())
    debs = [p for p in sbom_of(initramfs)["packages"] if p["SPDXID"].startswith(("SPDXRef-deb-",
                                                                                 "SPDXRef-firmware-deb-"))]
    assert any(p["SPDXID"].startswith("SPDXRef-firmware-deb-") for p in debs)
    assert not (unpacked / firmware.COPYRIGHTS).exists()  # read at build time, not shipped
    assert {p["name"] for p in debs} <= set(licenses)
    unasserted = sorted({p["name"] for p in debs if p["licenseDeclared"] == "NOASSERTION"})
    assert unasserted == sorted({p["name"] for p in debs if not licenses[p["name"]]})
    assert len(unasserted) < len(debs) / 3, unasserted
    print(f"\n{len(debs)} Debian packages, {len(unasserted)} without a machine-readable copyright file: "
          f"{' '.join(unasserted)}")


def test_the_sbom_lists_every_go_binary_and_module_go_version_reports(initramfs: Path, unpacked: Path) -> None:
    """`go version -m` over the unpacked image is the second opinion for the Go binaries."""
    from captainos.sources import golang

    report = subprocess.run([golang.go_binary(), "version", "-m", str(unpacked)], capture_output=True, text=True,
                            check=True).stdout
    expected: dict[str, set[tuple[str, str]]] = {}
    current, last = "", ("", "")
    for line in report.splitlines():
        words = line.split("\t")
        if not line.startswith("\t"):
            current = "/" + str(Path(line.split(":")[0]).relative_to(unpacked))
            expected[current] = {("stdlib", line.split(": ", 1)[1].strip())}
        elif words[1] == "dep":
            last = (words[2], words[3])
            expected[current].add(last)
        elif words[1] == "=>":  # the module linked is the replacement
            expected[current].discard(last)
            expected[current].add((words[2], words[3]))
    doc = sbom_of(initramfs)
    by_id = {p["SPDXID"]: p for p in doc["packages"]}
    listed: dict[str, set[tuple[str, str]]] = {}
    for rel in doc["relationships"]:
        binary = by_id.get(rel["spdxElementId"], {})
        if rel["relationshipType"] == "CONTAINS" and "packageFileName" in binary:
            module = by_id[rel["relatedSpdxElement"]]
            listed.setdefault(binary["packageFileName"], set()).add((module["name"], module["versionInfo"]))
    assert {"/usr/bin/containerd", "/usr/bin/runc", "/usr/bin/nerdctl", "/opt/cni/bin/bridge"} <= set(expected)
    assert listed == expected


def test_the_sbom_names_the_kernel_and_every_firmware_file(initramfs: Path, unpacked: Path, kernel: Path) -> None:
    import hashlib

    doc = sbom_of(initramfs)
    (linux,) = [p for p in doc["packages"] if p["SPDXID"] == "SPDXRef-kernel"]
    assert [d.name for d in (unpacked / "usr/lib/modules").iterdir()] == [linux["versionInfo"]]
    assert hashlib.sha256((kernel / "config").read_bytes()).hexdigest() in linux["comment"]
    info = json.loads((kernel / "kernel.json").read_text())
    assert info["source_id"] in linux["sourceInfo"] and linux["downloadLocation"] == info["url"]
    shipped = {f"./{p.relative_to(unpacked)}": hashlib.sha256(p.read_bytes()).hexdigest()
               for p in (unpacked / "usr/lib/firmware").rglob("*") if p.is_file() and not p.is_symlink()}
    listed = {f["fileName"]: f["checksums"][1]["checksumValue"] for f in doc["files"]}
    assert shipped and listed == shipped


def test_every_elf_file_finds_the_libraries_it_names(unpacked: Path) -> None:
    """What RemoveFiles takes out (image/mkosi.conf) is never a library that a program or
    library left in the image links: each DT_NEEDED resolves in the image's own library
    directories (or the file's RUNPATH)."""
    dirs = [Path("/usr/lib/x86_64-linux-gnu"), Path("/usr/lib"), Path("/usr/lib64")]
    broken, checked = [], 0
    for path in sorted(p for p in unpacked.rglob("*") if p.is_file() and not p.is_symlink()):
        with path.open("rb") as handle:
            if handle.read(4) != b"\x7fELF":
                continue
        dynamic = subprocess.run(["readelf", "-d", str(path)], capture_output=True, text=True).stdout
        checked += 1
        rel = Path("/") / path.relative_to(unpacked)
        runpaths = [Path(d.replace("$ORIGIN", str(rel.parent))) for m in re.findall(r"R(?:UN)?PATH.*\[(.*)\]", dynamic)
                    for d in m.split(":")]
        # A private library (systemd's) is found beside the one that loaded it first.
        for needed in re.findall(r"\(NEEDED\).*\[(.*)\]", dynamic):
            if not any(inside(unpacked, d / needed) for d in [*runpaths, rel.parent, *dirs]):
                broken.append(f"{rel} needs {needed}")
    assert checked > 100
    assert not broken, "\n".join(broken)


def test_firmware_is_what_the_drivers_declare_and_loads_as_xz(unpacked: Path, kernel: Path) -> None:
    """Every firmware file a module or built-in driver of the image declares is in
    /usr/lib/firmware as <name>.xz with a CRC32 check (what the kernel's loader verifies), or
    skipped in kernel/firmware.txt with a reason; no other file is there."""
    release = json.loads((kernel / "kernel.json").read_text())["version"]
    mods = unpacked / "usr/lib/modules" / release
    declared = {name for names in firmware.builtin_firmware((mods / "modules.builtin.modinfo").read_bytes()).values()
                for name in names}
    for ko in mods.rglob("*.ko*"):
        declared |= set(subprocess.run(["modinfo", "-F", "firmware", str(ko)], capture_output=True, text=True,
                                       check=True).stdout.split())
    report = json.loads((unpacked / firmware.REPORT.as_posix()).read_text())
    skipped = {s["name"] for s in report["skipped"]}
    fwlist = firmware.read_list()
    assert all(fwlist.skip_reason(name) for name in skipped)
    shipped = {str(p.relative_to(unpacked / "usr/lib/firmware")) for p in (unpacked / "usr/lib/firmware").rglob("*")
               if not p.is_dir()}
    assert shipped == {f"{name}.xz" for name in declared - skipped}
    assert "e100/d102e_ucode.bin.xz" in shipped and "tigon/tg3.bin.xz" in shipped
    for name in shipped:
        data = (unpacked / "usr/lib/firmware" / name).read_bytes()
        assert data[6:8] == b"\x00\x01", f"{name}: not an XZ stream with a CRC32 check"
    subprocess.run(["xz", "-t", *(str(unpacked / "usr/lib/firmware" / n) for n in sorted(shipped))], check=True)
    # docs/firmware-map.tsv, the page's map, says the same: every declared name, its package.
    rows = [line.split("\t") for line in (REPO / "docs/firmware-map.tsv").read_text().splitlines()[1:]]
    assert {row[1] for row in rows} == declared
    packages = {f["name"]: f["package"] for f in report["files"]}
    assert {row[1]: row[2] for row in rows if row[1] in packages} == packages


def machine(kernel: Path, initramfs: Path, append: str = "", **kwargs: object) -> qemu.Machine:
    return qemu.Machine(Arch.AMD64, kernel=kernel / "vmlinuz", initrd=initramfs, append=append,
                        accel=Accel.TCG, **kwargs)  # type: ignore[arg-type]


def selftest(guest: qemu.Guest) -> tuple[str, dict[str, str], list[dict[str, str]]]:
    """(verdict, info lines by key, JSON log lines of our programs) from one boot."""
    verdict = guest.wait_for(VERDICT, timeout=BOOT_TIMEOUT).group(1)
    text = guest.serial()
    info = dict(re.findall(r"CAPTAINOS-SELFTEST: info ([^:]+): (.*?)\r?$", text, re.M))
    logs = [json.loads(m) for m in re.findall(r"CAPTAINOS-SELFTEST: log (\{.*\})\r?$", text, re.M)]
    return verdict, info, logs


def test_selftest_passes_and_the_power_button_powers_off(kernel: Path, initramfs: Path, tmp_path: Path) -> None:
    """The self-test's checks on the test profile's default boot; then, the system up with
    logind, the power button (ACPI) powers the machine off. One boot for both."""
    with qemu.Guest(machine(kernel, initramfs, "captainos.selftest=nopoweroff"), workdir=tmp_path) as guest:
        verdict, info, _ = selftest(guest)
        log.info(f"time from QEMU start to verdict: {guest.elapsed():.0f}s")
        assert verdict == "PASS", guest.tail()
        assert "ok" in info["runc container (pivot_root)"]
        assert "172.17." in info["image container on overlayfs with CNI bridge"]
        assert re.match(r"rootfs +1\.[78]G", info["root"]), info["root"]  # 2 GiB less the 256 MiB reserve
        # captainos-zram.service: no swap on a machine with 2 GiB (zram only below 1 GiB).
        assert info["swap"] == "none", info["swap"]
        # /etc/.updated and /var/.updated: sysusers and the other update units skip at boot.
        units = dict(pair.split("=") for pair in info["update units"].split())
        assert units["systemd-sysusers"] == units["systemd-update-done"] == "skipped", units
        assert "ran" not in units.values(), units
        pressed = time.monotonic()
        guest.monitor("system_powerdown")
        assert guest.wait_exit(180) == 0
        log.info(f"power button to QEMU exit: {time.monotonic() - pressed:.0f}s")
        assert "reboot: Power down" in guest.serial()


def test_a_root_that_does_not_fit_stops_in_init_with_the_reason(kernel: Path, initramfs: Path, tmp_path: Path) -> None:
    """A root tmpfs smaller than the image (what a 384 MiB machine gets by default: half its
    RAM) makes the kernel stop unpacking with a write error and leave files out: /init stops
    with one line saying so instead of starting systemd on that root."""
    with qemu.Guest(machine(kernel, initramfs, "initramfs_options=size=150M"), workdir=tmp_path) as guest:
        found = guest.wait_for(r'"prog":"init","msg":"the initramfs did not unpack completely \(([^)]*)\)',
                               timeout=BOOT_TIMEOUT)
        assert found.group(1) == "write error", guest.tail()
        assert "initramfs_options=size=90%" in guest.serial()
        assert "systemd[1]" not in guest.serial() and "Welcome to" not in guest.serial()


def test_without_our_init_runc_cannot_pivot_root(kernel: Path, initramfs: Path, tmp_path: Path) -> None:
    """The negative control for docs/decisions/init.md: systemd straight on the initramfs
    root (rdinit=) makes every container fail in pivot_root, and the self-test says so."""
    m = machine(kernel, initramfs, "rdinit=/usr/lib/systemd/systemd")
    with qemu.Guest(m, workdir=tmp_path) as guest:
        verdict, _, _ = selftest(guest)
        assert verdict.startswith("FAIL"), guest.tail()
        assert "pivot_root" in verdict


def test_static_ipam_on_a_maximal_smee_command_line(kernel: Path, initramfs: Path, tmp_path: Path) -> None:
    """Every parameter Smee and CaptainOS know (proxies, ipam= with every field, credentials,
    VLAN, interface), plus operator extras up to the kernel's limit: 31 words that Linux hands
    /init as environment variables (one more panics Debian's kernel: test_kernel.py). The
    agent's image is left out, so the setup does not wait for a registry.
    QEMU's user network always offers DHCP (it would lease 10.0.2.15): seeing only the ipam
    address, hostname and DNS proves networkd did not ask for one."""
    ipam = f"ipam={MAC.replace(':', '-')}::10.0.2.50:255.255.255.0:10.0.2.2:captest:10.0.2.3:lab.example:10.0.2.2"
    words = ["facility=onprem", "syslog_host=10.0.2.2", "syslog_port=5514", "grpc_authority=10.0.2.2:42113",
             "tinkerbell_tls=false", "tinkerbell_insecure_tls=false", f"worker_id={MAC}", f"hw_addr={MAC}",
             "modules=loop,squashfs,sd-mod,usb-storage", "registry_username=admin", f"registry_password={SECRET}",
             "insecure_registries=10.0.2.2:5000", "HTTP_PROXY=http://10.0.2.2:3128",
             "HTTPS_PROXY=http://10.0.2.2:3128", "NO_PROXY=10.0.0.0/8,.example", "vlan_id=42", ipam,
             "interface=enp0s2"]
    words += [f"extra{i}=x" for i in range(31 - len(words))]
    # captainos.zram=on (a module-style word: never an environment variable) asks for swap on
    # this 2 GiB machine: half the RAM, compressed.
    append = " ".join(["intel_iommu=on", "iommu=pt", "console=tty0", *words, "captainos.zram=on", "console=ttyS0"])
    with qemu.Guest(machine(kernel, initramfs, append), workdir=tmp_path) as guest:
        verdict, info, logs = selftest(guest)
        assert "Too many boot env vars" not in guest.serial()
        assert verdict == "PASS", guest.tail()
        assert re.fullmatch(r"/dev/zram0 partition 10\d{8}", info["swap"].strip()), info["swap"]
        assert [a.split("=")[1] for a in info["addresses"].split()] == ["10.0.2.50/24"], info["addresses"]
        assert info["hostname"] == "captest"
        assert info["dns"].split() == ["10.0.2.3"]
        assert any(entry["msg"] == "static network from ipam" for entry in logs), logs


def test_bad_parameters_are_logged_and_the_system_still_boots(kernel: Path, initramfs: Path,
                                                              tmp_path: Path) -> None:
    bad = ('ipam=garbage vlan_id=5000 hw_addr=52:54:00:12:34:56 interface="eth0 eth1" '
           'tink_worker_image="reg.local/tink agent:1" registry_username=admin '
           f"registry_password={SECRET} syslog_host=bad_host! syslog_port=x foo=a=b unknownflag")
    with qemu.Guest(machine(kernel, initramfs, bad), workdir=tmp_path) as guest:
        verdict, info, logs = selftest(guest)
        text = guest.serial()
        # The only casualties are the units whose own input is unusable.
        failed_units = re.search(r"CAPTAINOS-SELFTEST: check failed: failed units: (.*?)\r?$", text, re.M)
        assert failed_units, verdict
        assert set(failed_units.group(1).split()) == {"tink-agent-setup.service",
                                                     "captainos-syslog@tink-agent-setup.service",
                                                     "captainos-syslog@tink-agent.service"}, verdict
        assert re.findall(r"CAPTAINOS-SELFTEST: check failed: (?!failed units)(.*)", text) == []
        assert info["addresses"], "DHCP still configures the NIC"
        assert "ok" in info["runc container (pivot_root)"]
        # The debug shell is still there: the serial getty logged root in and bash prompted.
        assert re.search(r"login: root \(automatic login\)", text), guest.tail()
        assert re.search(r"root@\S+:~# ", text), guest.tail()
        # The boot's parse refused each bad value once, with a console line (params.tsv's kinds).
        for refused in ("ipam: expected 9 colon-separated fields, not 1", "vlan_id: not a VLAN id (1-4094)",
                        "interface: not an interface name", "tink_worker_image: not an image reference",
                        "syslog_host: not a host name or IP address", "syslog_port: not a port (1-65535)"):
            assert f"captainos: captainos-cmdline: refusing {refused}" in text, refused
        messages = [entry["msg"] for entry in logs if entry["level"] == "error"]
        # and its error lines reach the journal through the kernel's log
        generator = [entry for entry in logs if entry["prog"] == "captainos-cmdline"]
        assert {"level": "error", "prog": "captainos-cmdline", "msg": "refusing a parameter: not a VLAN id (1-4094)",
                "param": "vlan_id", "value": "5000"} in generator, generator
        assert "syslog_host is not a host name or IP address; nothing forwarded" in messages
        # The kernel itself echoes its command line (three notices at boot; only loglevel can
        # hide them); nothing of ours may repeat the secret.
        kernel_echo = re.compile(r"\] (Command line|Kernel command line|Unknown kernel command line parameters)")
        leaks = [line for line in text.splitlines() if SECRET in line and not kernel_echo.search(line)]
        assert leaks == []


def test_remote_syslog_gets_rfc5424_with_the_dhcp_hostname(kernel: Path, initramfs: Path,
                                                            tmp_path: Path) -> None:
    """The setup's log (a pull that keeps failing: no registry) reaches a UDP listener on
    the host as RFC 5424, every line with the host name QEMU's DHCP server gave, each line
    once even though the forwarder is restarted mid-way (test profile unit); no credential."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    listener.bind(("127.0.0.1", 0))
    listener.settimeout(1.0)
    port = listener.getsockname()[1]
    append = (f"syslog_host=10.0.2.2 syslog_port={port} tink_worker_image=10.0.2.2:1/tink-agent:v1 "
              f"registry_username=admin registry_password={SECRET} captainos.selftest=off "
              "captainos.test.syslog_restart")
    m = machine(kernel, initramfs, append, netdev="user,id=net0,hostname=captest-dhcp")
    received: list[str] = []
    with qemu.Guest(m, workdir=tmp_path) as guest:
        deadline = time.monotonic() + BOOT_TIMEOUT
        restarted_at = None
        # Collect until two more pull attempts were logged after the restart (back-off 2, 4,
        # 8, 16 s: at most about 30 s).
        while time.monotonic() < deadline:
            if restarted_at is None and "syslog forwarder restarted" in guest.serial():
                restarted_at = len(received)
            if restarted_at is not None and sum("pulling the agent image" in r for r in received[restarted_at:]) >= 2:
                break
            try:
                received.append(listener.recv(65536).decode(errors="replace"))
            except TimeoutError:
                if guest.proc is not None and guest.proc.poll() is not None:
                    break
        listener.close()
        assert received, f"nothing arrived on UDP {port}; serial tail:\n{guest.tail()}"
        assert restarted_at is not None, f"the forwarder was never restarted; serial tail:\n{guest.tail()}"
    retry = next(r for r in received if "pull failed, retrying" in r)
    # <PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID STRUCTURED-DATA MSG
    header = re.match(r"<(\d+)>1 \S+ (\S+) (\S+) ", retry)
    assert header, retry
    assert header.group(3) == "tink-agent-setup"
    parsed = [re.match(r"<\d+>1 \S+ (\S+) \S+ \S+ \S+ \S+ (.*)", r) for r in received]
    assert all(parsed), received
    assert {match.group(1) for match in parsed if match} == {"captest-dhcp"}  # the first line too
    # Lines with an attempt number are unique in the journal ("waiting for containerd" may
    # legitimately repeat): each must arrive once, before and after the restart.
    attempts = [match.group(2) for match in parsed if match and '"attempt":' in match.group(2)]
    assert len(attempts) == len(set(attempts)), "a line arrived twice:\n" + "\n".join(attempts)
    assert not [r for r in received if SECRET in r or "admin" in r]


# Smee's two console sets (docs: ../shared/reference/kernel-cmdline.md): its iPXE script's and
# the one its ISO patcher writes (the last, ttyS1 with no baud rate, becomes /dev/console).
SMEE_NETBOOT_CONSOLES = "console=tty0 console=ttyS1,115200"
SMEE_ISO_CONSOLES = ("console=tty0 console=ttyS0,115200 console=ttyAMA0 console=ttyS0 console=tty0 console=tty1 "
                     "console=ttyS1")


def console_report(kernel: Path, initramfs: Path, tmp_path: Path, consoles: str, report_tty: str,
                   serial_ports: int, extra: tuple[str, ...] = (), enter_on_ttys0: bool = False
                   ) -> tuple[dict[str, tuple[str, int]], dict[str, str], list[str]]:
    """Boot with exactly these console= words and this many serial ports; return (getty unit ->
    (state, restarts), the other report fields, the text each serial port received). With
    enter_on_ttys0, Enter is then typed on ttyS0 once the report is there (ttyS0's text goes on
    past the report's last line to the shell it started)."""
    logs = [tmp_path / "ttyS0.log", tmp_path / "ttyS1.log"][:serial_ports]
    m = machine(kernel, initramfs, f"{consoles} captainos.selftest=off captainos.test.consoles={report_tty}",
                default_console=False, serial_log=logs[0], serial2_log=logs[1] if serial_ports > 1 else None,
                serial_socket=tmp_path / "ttyS0.sock" if enter_on_ttys0 else None, extra=extra)
    report_log = logs[int(report_tty[-1])]
    with qemu.Guest(m, workdir=tmp_path / "qemu") as guest:
        deadline = time.monotonic() + BOOT_TIMEOUT
        while not report_log.exists() or "CONSOLES: done" not in report_log.read_text(errors="replace"):
            assert time.monotonic() < deadline, f"no console report within {BOOT_TIMEOUT}s"
            assert guest.proc is None or guest.proc.poll() is None, "QEMU exited"
            time.sleep(2)
        if enter_on_ttys0:
            guest.wait_for("CONSOLES: done", timeout=10)
            guest.type("\r")
            guest.wait_for(r"root@\S+:~#", timeout=120)
        texts = [log.read_text(errors="replace").replace("\r", "") for log in logs]
    report = texts[int(report_tty[-1])]
    # Not anchored at the line's start: the autologin shell's prompt may land on the same port
    # just before a report line (seen in CI: "root@localhost:~# CONSOLES: getty getty@tty1...").
    # Each report line is one write, so nothing lands inside one.
    gettys = {unit: (state, int(n)) for unit, state, n in
              re.findall(r"CONSOLES: getty (\S+) (\S+) restarts=(\d+)$", report, re.M)}
    fields = dict(re.findall(r"CONSOLES: (active|system)=(.*)$", report, re.M))
    return gettys, fields, texts


def test_smee_netboot_consoles_get_a_root_shell(kernel: Path, initramfs: Path, tmp_path: Path) -> None:
    """console=tty0 console=ttyS1,115200: a root getty on ttyS1 and on the first VT, nothing
    on ttyS0, and the boot finishes."""
    gettys, fields, (ttys0, ttys1) = console_report(kernel, initramfs, tmp_path, SMEE_NETBOOT_CONSOLES, "ttyS1", 2)
    assert fields["active"].split() == ["tty0", "ttyS1"], fields
    assert fields["system"] == "running", fields
    assert sorted(gettys) == ["getty@tty1.service", "serial-getty@ttyS1.service"], gettys
    assert all(state == "active/running" for state, _ in gettys.values()), gettys
    assert re.search(r"root@\S+:~#", ttys1), ttys1[-2000:]  # autologin reached a shell on ttyS1
    assert "Linux version" not in ttys0 and "login" not in ttys0, ttys0[-1000:]  # the firmware's output only


def test_smee_iso_consoles_with_missing_ones_do_not_stall(kernel: Path, initramfs: Path, tmp_path: Path) -> None:
    """The ISO set on a machine with one serial port: ttyS0 without a baud rate gets a getty,
    ttyAMA0 (not on amd64) and ttyS1 (no UART here, yet the last console=) get none and
    stall nothing. With the last console= missing, the first console registered (the VT) is
    /dev/console and gets its shell at once; ttyS0's getty waits for Enter, then logs root in."""
    gettys, fields, (ttys0,) = console_report(kernel, initramfs, tmp_path, SMEE_ISO_CONSOLES, "ttyS0", 1,
                                              enter_on_ttys0=True)
    before_enter, after_enter = ttys0.split("CONSOLES: done", 1)
    assert fields["system"] == "running", fields
    assert sorted(gettys) == ["getty@tty1.service", "serial-getty@ttyS0.service"], gettys
    # Running, and not in a restart loop (agetty on ttyS0 was seen restarting once, in one
    # boot of three, while the kernel was still printing to that port).
    assert all(state == "active/running" and restarts <= 1 for state, restarts in gettys.values()), gettys
    assert fields["active"].split() == ["ttyS0", "tty0"], fields  # the last is /dev/console
    assert "press Enter for a root shell on this console." in before_enter, before_enter[-2000:]
    assert not re.search(r"root@\S+:~#", before_enter), before_enter[-2000:]
    assert re.search(r"root@\S+:~#", after_enter), after_enter[-2000:]


def test_a_usb_serial_console_gets_a_root_shell(kernel: Path, initramfs: Path, tmp_path: Path) -> None:
    """console=ttyUSB0 on a USB serial adapter (QEMU's usb-serial, an FTDI: ftdi_sio): the
    port appears after the getty generator ran, and the udev rule starts its getty."""
    usb_log = tmp_path / "ttyUSB0.log"
    extra = ("-device", "qemu-xhci,id=ux", "-chardev", f"file,id=us0,path={usb_log}",
             "-device", "usb-serial,chardev=us0,bus=ux.0")
    gettys, fields, _ = console_report(kernel, initramfs, tmp_path, "console=ttyS0 console=ttyUSB0,115200", "ttyS0",
                                       1, extra)
    assert fields["system"] == "running", fields
    assert gettys.get("serial-getty@ttyUSB0.service", ("absent", 0))[0] == "active/running", gettys
    assert gettys.get("serial-getty@ttyS0.service", ("absent", 0))[0] == "active/running", gettys
    assert re.search(r"root@\S+:~#", usb_log.read_text(errors="replace")), usb_log.read_text(errors="replace")[-2000:]
