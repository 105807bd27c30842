"""`./build.py bench`: image size, boot time to the agent, RAM floor, build times, reproducibility.

Every figure is printed with the command that produced it, as a Markdown table ready for
docs/benchmarks.md. Benchmarks print numbers; they assert nothing and are not part of the
default test run (a smoke test runs `bench --only size` on a tiny image).
"""

from __future__ import annotations

import contextlib
import dataclasses
import platform
import shutil
import statistics
import tarfile
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from captainos.core import cache, log
from captainos.core.config import REPO, Accel, Arch, Config
from captainos.core.errors import CaptainError
from captainos.core.run import pipe
from captainos.lab import qemu
from captainos.stages import artifacts, cpio, segments, site

SECTIONS = ("size", "boot", "netboot", "ram", "build", "repro", "fleet", "nics")


@dataclass
class Figure:
    name: str
    value: str
    command: str


@dataclass
class Report:
    figures: list[Figure] = dataclasses.field(default_factory=list)
    tables: list[str] = dataclasses.field(default_factory=list)

    def add(self, name: str, value: str, command: str) -> None:
        self.figures.append(Figure(name, value, command))
        log.info(f"    {name}: {value}")

    def markdown(self, cfg: Config) -> str:
        head = (f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on {platform.node()} "
                f"({_cpus()} CPUs, {_mem_gib():.0f} GiB, {platform.machine()}), arch {cfg.arch.value}.\n\n")
        rows = ["| figure | value | command |", "| --- | --- | --- |"]
        rows += [f"| {f.name} | {f.value} | `{f.command}` |" for f in self.figures]
        return head + "\n".join(rows) + "\n\n" + "\n\n".join(self.tables) + ("\n" if self.tables else "")


def _cpus() -> int:
    import os

    return os.cpu_count() or 0


def _mem_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / 1024 / 1024
    return 0.0


def _mib(size: float) -> str:
    return f"{size / 1_000_000:.1f} MB ({int(size):,} bytes)"


# --- size --------------------------------------------------------------------------------------

FIRMWARE_DIR = "usr/lib/firmware/"


def size(report: Report, initramfs: Path, vmlinuz: Path | None, top: int = 20) -> None:
    """Compressed and uncompressed size, and the largest files and packages."""
    command = f"./build.py bench --only size  # {initramfs.name}"
    report.add("initramfs (zstd)", _mib(initramfs.stat().st_size), f"stat -c %s {initramfs}")
    if vmlinuz is not None and vmlinuz.is_file():
        report.add("vmlinuz", _mib(vmlinuz.stat().st_size), f"stat -c %s {vmlinuz}")
    frames = segments.frames(initramfs.read_bytes())
    parts = [cpio.decompress_data(frame, initramfs.name) for frame in frames]
    blob = b"".join(parts)
    report.add("rootfs uncompressed", _mib(len(blob)), f"zstd -dc {initramfs} | wc -c")
    for number, (frame, part) in enumerate(zip(frames, parts, strict=True), 1):
        members = list(cpio.members(part))
        where = next((m.name for m in members if m.is_file), "?")
        report.add(f"segment {number} (from /{where})", f"{_mib(len(frame))}, {len(members)} entries",
                   command)
        named = {m.name: m for m in members}
        archive, listing = named.get(str(site.EMBED_ARCHIVE)), named.get(str(site.EMBED_LIST))
        if archive is not None:
            # Layers are already gzip: the archive costs about its own size, compressed or not.
            count = len(listing.data.splitlines()) if listing is not None else 0
            report.add("embedded images (--embed-images)",
                       f"{count} images, {_mib(archive.size)} archive, "
                       f"{100 * len(frame) / initramfs.stat().st_size:.1f}% of the initramfs (segment {number})",
                       command)
    files = [m for m in cpio.members(blob) if m.is_file]
    total = sum(m.size for m in files) or 1
    # Firmware is stored as .xz, which zstd cannot shrink: its bytes are what it costs.
    fw = [m for m in files if m.name.startswith(FIRMWARE_DIR)]
    fw_bytes = sum(m.size for m in fw)
    report.add("firmware (/usr/lib/firmware, xz)", f"{_mib(fw_bytes)}, {len(fw)} files, "
               f"{100 * fw_bytes / initramfs.stat().st_size:.1f}% of the initramfs", command)
    largest = sorted(files, key=lambda m: m.size, reverse=True)[:top]
    rows = [f"Largest {top} files ({command}). 'zstd alone' is the file compressed by itself at "
            "level 19: an upper bound, since in the image the 64 MiB window lets the Go binaries "
            "share their common code (the segment sizes above are what they really take).", "",
            "| file | bytes | share | zstd alone |", "| --- | ---: | ---: | ---: |"]
    for member in largest:
        packed = len(_zstd(member.data))
        rows.append(f"| `/{member.name}` | {member.size:,} | {100 * member.size / total:.1f}% | {packed:,} |")
    report.tables.append("\n".join(rows))
    packages = _package_sizes(blob)
    if packages:
        rows = [f"Largest {top} Debian packages by installed bytes still in the image:", "",
                "| package | bytes | share |", "| --- | ---: | ---: |"]
        for name, amount in sorted(packages.items(), key=lambda kv: kv[1], reverse=True)[:top]:
            rows.append(f"| {name} | {amount:,} | {100 * amount / total:.1f}% |")
        report.tables.append("\n".join(rows))


def _zstd(data: bytes) -> bytes:
    return pipe(["zstd", "-19", "-q", "-c"], data)


def _package_sizes(blob: bytes) -> dict[str, int]:
    """Bytes per Debian package, from dpkg's file lists if the image still carries them."""
    sizes = {m.name: m.size for m in cpio.members(blob) if m.is_file}
    owner: dict[str, str] = {}
    for member in cpio.members(blob):
        if member.name.startswith("var/lib/dpkg/info/") and member.name.endswith(".list"):
            package = member.name.rsplit("/", 1)[1].removesuffix(".list").split(":")[0]
            for line in member.data.decode(errors="replace").splitlines():
                owner.setdefault(line.lstrip("/"), package)
    totals: dict[str, int] = defaultdict(int)
    for name, amount in sizes.items():
        if name in owner:
            totals[owner[name]] += amount
    return dict(totals)


# --- boot and RAM --------------------------------------------------------------------------------

def kernel_floor(cfg: Config, vmlinuz: Path, workdir: Path) -> float:
    """Seconds from QEMU start to poweroff for the same kernel with a busybox initramfs."""
    initrd = busybox_initramfs(workdir / "busybox.cpio.zst", "echo CAPTAINOS-FLOOR")
    machine = qemu.Machine(cfg.arch, kernel=vmlinuz, initrd=initrd, mem="512M", smp=cfg.qemu_smp,
                           accel=_accel(cfg, vmlinuz))
    with qemu.Guest(machine, workdir=workdir / "floor") as guest:
        guest.wait_for("CAPTAINOS-FLOOR", timeout=300)
        guest.wait_exit(60)
        return guest.elapsed()


def _accel(cfg: Config, vmlinuz: Path) -> Accel:
    return qemu.resolve_accel(cfg.arch, cfg.qemu_accel, vmlinuz)


def busybox_initramfs(output: Path, script: str) -> Path:
    """A minimal initramfs: Debian's static busybox, /proc, the given shell lines, poweroff."""
    busybox = Path(shutil.which("busybox") or "/bin/busybox")
    init = f"#!/bin/busybox sh\n/bin/busybox mount -t proc proc /proc\n{script}\n/bin/busybox poweroff -f\n"
    entries: list[cpio.Entry] = [("bin", 0o40755, b""), ("bin/busybox", 0o100755, busybox.read_bytes()),
                                 ("proc", 0o40755, b""), ("dev", 0o40755, b""),
                                 ("dev/console", 0o20600, b"", (5 << 8) | 1), ("init", 0o100755, init.encode())]
    archive = cpio.write(entries)
    cache.atomic_write(output, _zstd(archive))
    return output


# Two tasks around the benchmark's workflow. The first, run as soon as the agent asks for
# work, writes where the CPU went until then (emulated, the boot is CPU-bound: a unit's CPU
# time is what it costs the agent's start): each unit's CPUUsageNSec, and each process's own
# and reaped children's time (kernel threads too: the initramfs unpack is a kworker), into the
# VM's /run. The last packs `systemd-analyze blame`, `critical-chain` and `plot` (an SVG of
# every unit's start), two units' journals and that CPU file as a tar into the VM's disk, where
# the harness reads them after the run. Actions run privileged; the host's root, /run and
# /proc are bind-mounted for a chroot, and the actions share the host's PID namespace (without
# it sd-bus cannot identify its peer: "No data available").
ANALYSIS_OFFSET = 8 << 20
BLAME_LINES = 15
CPU_LINES = 20
ANALYSIS_FILES = ("blame", "critical-chain", "plot.svg", "network", "agent-setup", "cpu")
HOST_MOUNTS = {"volumes": ["/dev:/dev", "/:/host", "/run:/host/run", "/proc:/host/proc"], "namespaces": {"pid": "host"}}
# busybox sh and awk in the action; USER_HZ is 100 on every architecture we build.
CPU_SCRIPT = (
    "set -e; cd /tmp; read up idle </host/proc/uptime"
    " && echo \"uptime ${up} s; idle (summed over CPUs) ${idle} s\" >cpu"
    " && echo '-- CPU seconds by unit (systemd CPUUsageNSec)' >>cpu"
    " && chroot /host /usr/bin/systemctl show --all -p Id -p CPUUsageNSec '*'"
    " | awk -F= '$1 == \"Id\" { id = $2 } $1 == \"CPUUsageNSec\" { ns = $2 }"
    " function out() { if (ns ~ /^[0-9]+$/ && ns > 0 && id !~ /\\.slice$/) printf \"%8.2f %s\\n\", ns / 1e9, id;"
    " id = \"\"; ns = \"\" } /^$/ { out() } END { out() }'"
    f" | sort -rn | head -n {CPU_LINES} >>cpu"
    " && echo '-- CPU seconds by process: own, reaped children, pid, name' >>cpu"
    " && for d in /host/proc/[0-9]*; do s=$(cat $d/stat 2>/dev/null) || continue; n=${s#*(}; n=${n%)*};"
    " set -- ${s##*) }; echo \"$(( ${12} + ${13} )) $(( ${14} + ${15} )) ${d##*/} $n\"; done"
    f" | sort -rn | head -n {CPU_LINES} | awk '{{ n = $0; sub(/^[^ ]+ [^ ]+ [^ ]+ /, \"\", n);"
    " printf \"%8.2f %8.2f %6s %s\\n\", $1 / 100, $2 / 100, $3, n }' >>cpu"
    " && mv cpu /host/run/captainos-bench-cpu"
)
CPU_TASK = {
    "name": "benchmark-boot-cpu",
    "actions": [{"name": "boot-cpu", "image": "{{ action_image }}", "timeout": 120, **HOST_MOUNTS,
                 "command": ["/bin/sh", "-c", CPU_SCRIPT]}],
}
ANALYSIS_TASK = {
    "name": "benchmark-boot-analysis",
    "actions": [{
        "name": "boot-analysis",
        "image": "{{ action_image }}",
        "timeout": 120,
        **HOST_MOUNTS,
        "command": ["/bin/sh", "-c",
                    "cd /tmp && sa='chroot /host /usr/bin/systemd-analyze'"
                    f" && $sa blame --no-pager | head -n {BLAME_LINES} >blame && test -s blame"
                    " && $sa critical-chain --no-pager >critical-chain && $sa plot >plot.svg"
                    " && chroot /host /usr/bin/journalctl -b -u systemd-networkd -o short-monotonic --no-pager"
                    " >network"
                    " && chroot /host /usr/bin/journalctl -b -u tink-agent-setup -o short-monotonic --no-pager"
                    " >agent-setup"
                    " && cp /host/run/captainos-bench-cpu cpu"
                    f" && tar -cf analysis.tar {' '.join(ANALYSIS_FILES)}"
                    f" && dd if=analysis.tar of=/dev/vda bs=512 seek={ANALYSIS_OFFSET // 512} conv=notrunc,fsync"],
    }],
}


def with_analysis(workflow_file: Path, dest: Path) -> Path:
    """A copy of the workflow with the CPU snapshot task first and the boot-analysis task last."""
    import yaml

    try:
        doc = yaml.safe_load(workflow_file.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise CaptainError(f"cannot read workflow {workflow_file}: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("tasks"), list):
        raise CaptainError(f"workflow {workflow_file} has no 'tasks' list")
    doc["tasks"] = [CPU_TASK, *doc["tasks"], ANALYSIS_TASK]
    cache.atomic_write(dest, yaml.safe_dump(doc, sort_keys=False))
    return dest


def read_analysis(disk: Path) -> dict[str, bytes]:
    """The files the last task wrote into the VM's disk, by name ({} if it wrote none)."""
    with disk.open("rb") as handle:
        handle.seek(ANALYSIS_OFFSET)
        try:
            with tarfile.open(fileobj=handle, mode="r:") as tar:
                found = {}
                for member in tar.getmembers():
                    extracted = tar.extractfile(member) if member.isfile() else None
                    if member.name in ANALYSIS_FILES and extracted is not None:
                        found[member.name] = extracted.read()
                return found
        except tarfile.ReadError:
            return {}


def boot(report: Report, cfg: Config, vmlinuz: Path, initramfs: Path, runs: int, workdir: Path,
         workflow_file: Path, artifacts_dir: Path) -> None:
    """Median of N end-to-end runs: milestones from serial/server timestamps, and the kernel
    floor; `systemd-analyze blame` and `critical-chain` of the last run in the report, its
    `plot` as boot-plot.svg in artifacts_dir."""
    from captainos.lab import e2e

    marks: dict[str, list[float]] = defaultdict(list)
    workflow_file = with_analysis(workflow_file, workdir / "bench-workflow.yaml")
    analysis: dict[str, bytes] = {}
    for number in range(runs):
        plan = e2e.Plan(workflow=workflow_file, kernel=vmlinuz, initrd=initramfs)
        with e2e.Harness(cfg, plan, workdir=workdir / f"boot-{number}") as harness:
            result = harness.run()
        if result.state != "SUCCESS":
            raise CaptainError(f"benchmark workflow ended {result.state}")
        for label, mark in result.timeline:
            if mark is not None:
                marks[label].append(mark)
        analysis = read_analysis(result.disk)
    floors = [kernel_floor(cfg, vmlinuz, workdir / f"floor-{n}") for n in range(runs)]
    floor = statistics.median(floors)
    command = f"./build.py bench --only boot --runs {runs}"
    report.add("kernel-only floor (busybox, median)", f"{floor:.1f} s", command)
    for label, values in marks.items():
        if label == "QEMU started":
            continue
        median = statistics.median(values)
        report.add(f"boot: {label} (median of {len(values)})", f"{median:.1f} s ({median / floor:.1f}x floor)",
                   command)
    for name, title in (("blame", f"`systemd-analyze blame`, top {BLAME_LINES}"),
                        ("critical-chain", "`systemd-analyze critical-chain`"),
                        ("network", "`journalctl -u systemd-networkd -o short-monotonic` (when the NIC is "
                                    "renamed, configured, gets its lease)"),
                        ("agent-setup", "`journalctl -u tink-agent-setup -o short-monotonic` (where the setup's "
                                        "time goes)"),
                        ("cpu", f"CPU time at the agent's first request (top {CPU_LINES} units and processes; "
                                "emulated, the boot is CPU-bound)")):
        text = analysis.get(name, b"").decode(errors="replace").strip()
        report.tables.append(f"{title} in the VM, last run ({command}; the workflow's last task writes it to "
                             "the VM's disk):\n\n```\n" + (text or "(the guest wrote nothing)") + "\n```")
    if "plot.svg" in analysis:
        plot = artifacts_dir / "boot-plot.svg"
        cache.atomic_write(plot, analysis["plot.svg"])
        report.tables.append(f"`systemd-analyze plot` of the last run (every unit's start and end): {plot}")


def netboot(report: Report, cfg: Config, runs: int, workdir: Path, workflow_file: Path) -> None:
    """Median of N provisioning runs through the real Tinkerbell (the lab), BIOS and UEFI:
    power-on, Smee's DHCP answer, iPXE, the kernel, the OS's start, the agent, the first action,
    the end."""
    from captainos.lab.lab import Lab, Provision

    marks: dict[tuple[str, str], list[float]] = defaultdict(list)
    with Lab(cfg, root=workdir / "lab", iso=False) as lab:
        for number in range(runs):
            for mode in ("bios", "uefi"):
                out = lab.provision(Provision(workflow=workflow_file, boot=mode, index=number + 1),
                                    workdir=workdir / f"netboot-{mode}-{number}")
                if out.state != "SUCCESS":
                    raise CaptainError(f"benchmark workflow ended {out.state} ({mode} netboot)")
                for label, mark in out.timeline:
                    if mark is not None and label != "power on":
                        marks[(mode, label)].append(mark)
    command = f"./build.py bench --only netboot --runs {runs}"
    for (mode, label), values in marks.items():
        report.add(f"netboot {mode}: {label} (median of {len(values)})", f"{statistics.median(values):.1f} s",
                   command)


NIC_SETUPS = (("one NIC", ""), ("a second NIC, its own DHCP server", "dhcp"),
              ("a second NIC, no DHCP answer", "silent"))


def nics(report: Report, cfg: Config, runs: int, workdir: Path, workflow_file: Path) -> None:
    """What a second NIC costs the boot, through the real Tinkerbell (UEFI netboot, one VM at a
    time): alone, beside a NIC on a network with a DHCP server of its own (named first by the
    kernel), and beside one whose DHCP never gets an answer. Medians of N runs each."""
    from captainos.lab.lab import Lab, Provision

    marks: dict[tuple[str, str], list[float]] = defaultdict(list)
    with Lab(cfg, root=workdir / "nics-lab", iso=False) as lab:
        for number in range(runs):
            for title, kind in NIC_SETUPS:
                out = lab.provision(Provision(workflow=workflow_file, boot="uefi", index=number + 1, other_network=kind,
                                              settle=2.0), workdir=workdir / f"nics-{kind or 'one'}-{number}")
                if out.state != "SUCCESS":
                    raise CaptainError(f"benchmark workflow ended {out.state} ({title})")
                for label, mark in out.timeline:
                    if label in ("kernel started", "agent started", "workflow done") and mark is not None:
                        marks[(title, label)].append(mark)
    command = f"./build.py bench --only nics --runs {runs}"
    for (title, label), values in marks.items():
        report.add(f"{title}: {label} (median of {len(values)})", f"{statistics.median(values):.1f} s", command)


FLEET_SIZES = (1, 2, 4, 8)
FLEET_MEM = "384M"  # the RAM floor the README states (bench --only ram)


def fleet(report: Report, cfg: Config, workdir: Path, workflow_file: Path,
          sizes: tuple[int, ...] = FLEET_SIZES) -> list[str]:
    """N machines at once through one Tinkerbell (each its own Hardware, Workflow and tap, UEFI
    netboot, at the RAM floor), for each N: the time until the last is done, each machine's
    marks, what failed. With more machines than cores each runs slower, so every timeout of
    the boot and the agent setup is exercised. Returns what failed (run() fails after printing)."""
    from concurrent.futures import ThreadPoolExecutor

    from captainos.lab.lab import Lab, Provision
    from captainos.lab.vm import Run

    failed: list[str] = []
    with Lab(cfg, root=workdir / "fleet-lab", iso=False) as lab:
        lab.accel()  # the KVM probe once, outside every fleet's clock
        for size in sizes:
            def one(index: int, size: int = size) -> Run | Exception:
                plan = Provision(workflow=workflow_file, boot="uefi", index=index, mem=FLEET_MEM, timeout=1800.0,
                                 settle=2.0)
                try:
                    return lab.provision(plan, workdir=workdir / f"fleet-{size}-{index}")
                except Exception as exc:  # one machine's failure is a line of the report
                    return exc
            start = time.monotonic()
            with ThreadPoolExecutor(max_workers=size) as pool:
                outcomes = list(pool.map(one, range(1, size + 1)))
            elapsed = time.monotonic() - start
            command = "./build.py bench --only fleet"
            done = [o for o in outcomes if isinstance(o, Run) and o.state == "SUCCESS"]
            report.add(f"fleet of {size}: all done", f"{elapsed:.0f} s ({len(done)}/{size} SUCCESS)", command)
            for number, out in enumerate(outcomes, 1):
                if not isinstance(out, Run):
                    failed.append(f"fleet of {size}, machine {number}: {out}")
                    report.add(f"fleet of {size}, machine {number}", f"error: {str(out)[:120]}", command)
                    continue
                if out.state != "SUCCESS":
                    failed.append(f"fleet of {size}, machine {number}: {out.state}")
                marks = dict(out.timeline)
                shown = ", ".join(f"{label} {marks[label]:.0f} s" for label in
                                  ("kernel started", "agent started", "first action started", "workflow done")
                                  if marks.get(label) is not None)
                report.add(f"fleet of {size}, machine {number}", f"{out.state}: {shown}", command)
    return failed


def floor_search(works: Callable[[int], bool], low: int, high: int, step: int) -> int | None:
    """The smallest multiple of step in [low, high] for which works() holds, assuming that
    more always works once some amount does; None when even high does not."""
    if not works(high):
        return None
    lo, hi = low // step, high // step  # in units of step
    while lo < hi:
        mid = (lo + hi) // 2
        if works(mid * step):
            hi = mid
        else:
            lo = mid + 1
    return hi * step


# A probe fails at once when the VM's console shows that memory ran out: the kernel killed a
# process for memory, could not unpack the initramfs, /init stopped, or the kernel panicked.
RAM_GIVE_UP = (r"Out of memory: Killed process", r"Initramfs unpacking failed", r'\{"level":"error","prog":"init"',
               r"Kernel panic")


def ram_floor(report: Report, cfg: Config, workdir: Path, workflow_file: Path, vmlinuz: Path, initramfs: Path,
              low: int = 256, high: int = 1024, step: int = 64) -> None:
    """The smallest guest memory (64 MiB steps) with which a VM boots and completes the
    workflow, with no process killed for memory on the way: on amd64 netbooted through the
    real Tinkerbell (the lab: Smee, iPXE, the tink server); on arm64, which the lab does not
    boot, through the qemu-test harness (the kernel and initramfs given to QEMU, the real agent
    and registry, the harness's workflow server)."""
    command = f"./build.py bench --only ram{'' if cfg.arch is Arch.AMD64 else ' --arch ' + cfg.arch.value}"
    probes: list[str] = []
    with contextlib.ExitStack() as stack:
        probe: Callable[[int], str]
        if cfg.arch is Arch.AMD64:
            from captainos.lab.lab import Lab, Provision

            how = "netboot through the real Tinkerbell + workflow"
            lab = stack.enter_context(Lab(cfg, root=workdir / "lab", iso=False))

            def probe(mib: int) -> str:
                return lab.provision(Provision(workflow=workflow_file, mem=f"{mib}M", timeout=900, give_up=RAM_GIVE_UP),
                                     workdir=workdir / f"ram-{mib}").state
        else:
            how = "the qemu-test harness + workflow"

            def probe(mib: int) -> str:
                return harness_probe(cfg, workdir / f"ram-{mib}", workflow_file, vmlinuz, initramfs, mib)

        def works(mib: int) -> bool:
            try:
                state = probe(mib)
            except CaptainError as exc:
                state = f"failed ({exc.message})"
            log.info(f"    -m {mib}M: {state}")
            probes.append(f"{mib} MiB: {state}")
            return state == "SUCCESS"

        floor = floor_search(works, low, high, step)
    value = f"{floor} MiB" if floor is not None else f"fails even at {high} MiB"
    report.add(f"RAM floor ({how})", value, command)
    report.tables.append(f"RAM floor probes, in order ({command}): " + "; ".join(probes))


def harness_probe(cfg: Config, workdir: Path, workflow_file: Path, vmlinuz: Path, initramfs: Path, mib: int) -> str:
    """One end-to-end run of the qemu-test harness with MIB of guest memory: the workflow's
    final state. A console line showing memory running out (RAM_GIVE_UP) ends the run at once
    with a CaptainError, as anything else that stops it does."""
    from captainos.lab import e2e

    plan = e2e.Plan(workflow=workflow_file, kernel=vmlinuz, initrd=initramfs, timeout=900.0,
                    fail_patterns=e2e.Plan.fail_patterns + RAM_GIVE_UP)
    with e2e.Harness(dataclasses.replace(cfg, qemu_mem=f"{mib}M"), plan, workdir=workdir) as harness:
        return harness.run().state


# --- build times and reproducibility ------------------------------------------------------------

def _timed(action: Callable[[], object]) -> float:
    start = time.monotonic()
    action()
    return time.monotonic() - start


def build_times(report: Report, cfg: Config, workdir: Path) -> None:
    """Cold (empty cache dir) and cached time per stage; rebuild after one overlay change."""
    from captainos.stages import pipeline

    cold = dataclasses.replace(cfg, cache_dir=workdir / "cold-cache", out_dir=workdir / "cold-out")
    # The compile keeps its unpacked source and objects under build/<arch>/kernel (outside the
    # cache dir): without them the kernel figure is a real cold compile.
    cache.remove(cfg.build_dir / "kernel")
    kernel_entry: list[Path] = []
    tools_entry: list[Path] = []
    steps: list[tuple[str, Callable[[Config], object]]] = [
        ("kernel", lambda c: kernel_entry.append(pipeline.build_kernel(c))),
        ("tools", lambda c: tools_entry.append(pipeline.build_tools(c))),
        ("initramfs", lambda c: pipeline.build_initramfs(c, kernel_entry[-1], tools_entry[-1])),
    ]
    for name, step in steps:
        seconds = _timed(lambda step=step: step(cold))  # type: ignore[misc]
        report.add(f"build {name}, cold", f"{seconds:.0f} s", f"CAPTAINOS_CACHE=$(mktemp -d) ./build.py {name}")
        seconds = _timed(lambda step=step: step(cold))  # type: ignore[misc]
        report.add(f"build {name}, cached", f"{seconds:.1f} s", f"./build.py {name}  # again")
    marker = REPO / "image" / "mkosi.extra" / "etc" / "captainos-bench-overlay-change"  # an existing dir
    marker.write_text(f"{time.time()}\n")
    try:
        seconds = _timed(lambda: pipeline.build_initramfs(cold, kernel_entry[-1], tools_entry[-1]))
    finally:
        marker.unlink()
    report.add("rebuild after one overlay file changed", f"{seconds:.0f} s",
               "echo x > image/mkosi.extra/etc/f && ./build.py initramfs")


def copy_checkout(dest: Path) -> Path:
    """The checkout as it is now (uncommitted changes too), without its outputs, caches and
    object dirs: a second machine's clone, as far as one machine can have one."""
    shutil.copytree(REPO, dest, symlinks=True,
                    ignore=shutil.ignore_patterns(".git", "build", "out", "__pycache__", ".pytest_cache", "*.egg-info"))
    return dest


def option_env(cfg: Config) -> dict[str, str]:
    """cfg's build options as the environment variables that set them (the same inputs in
    another checkout); the cache and output dirs are the caller's."""
    from captainos.core import config
    from captainos.stages import pipeline

    env = {}
    for opt in (*config.options(), *pipeline.options()):
        if opt.name in ("cache_dir", "out_dir", "no_cache"):
            continue
        value = config._jsonable(opt.get(cfg))
        if isinstance(value, bool):
            env[opt.env] = "1" if value else ""
        elif value not in (None, "", [], ()):
            env[opt.env] = ",".join(map(str, value)) if isinstance(value, list) else str(value)
    return env


def _build_in(checkout: Path, cache_dir: Path, cfg: Config, no_cache: bool = False) -> Path:
    """`./build.py initramfs` with cfg's options in that checkout and cache dir; returns its out/."""
    from captainos.core.run import run

    env = {**option_env(cfg), "CAPTAINOS_CACHE": str(cache_dir), "OUT_DIR": str(checkout / "out"),
           "NO_CACHE": "1" if no_cache else ""}
    run(["python3", str(checkout / "build.py"), "initramfs"], env=env, cwd=checkout,
        log_file=checkout.parent / f"build-{cache_dir.name}{'-no-cache' if no_cache else ''}.log")
    return checkout / "out"


def reproducibility(report: Report, cfg: Config, workdir: Path) -> None:
    """The same inputs three ways: a cold build (a copy of the checkout, an empty cache dir and
    no object dirs: what a second machine does), a NO_CACHE rebuild in that copy, and the
    cached rebuild of this checkout. Equal sha256 for the kernel and the initramfs, or the files
    that differ; and the Debian package versions each used (packages-<arch>.lock)."""
    from captainos.stages import pipeline

    checkout = copy_checkout(workdir / "checkout")
    cold_out = _build_in(checkout, workdir / "cold-cache", cfg)
    keep = workdir / "cold-out"  # the NO_CACHE rebuild replaces the copy's out/
    shutil.copytree(cold_out, keep, symlinks=True)
    builds = {"cold build (empty cache dir, fresh checkout copy)": keep,
              "NO_CACHE rebuild of that": _build_in(checkout, workdir / "cold-cache", cfg, no_cache=True)}
    kernel_entry = pipeline.build_kernel(cfg)
    pipeline.build_initramfs(cfg, kernel_entry, pipeline.build_tools(cfg))
    builds["cached rebuild (this checkout and cache)"] = cfg.out_dir
    names = [artifacts.vmlinuz_name(cfg.arch), artifacts.initramfs_name(cfg.arch), artifacts.lock_name(cfg.arch)]
    sums = {label: [cache.sha256_file(out / n) if (out / n).is_file() else "-" for n in names]
            for label, out in builds.items()}
    command = "./build.py bench --only repro"
    for label, digests in sums.items():
        report.add(label, ", ".join(f"{n} {d[:16]}" for n, d in zip(names, digests, strict=True)), command)
    first = next(iter(builds.values()))
    for number, name in enumerate(names):
        found = {digests[number] for digests in sums.values()}
        if len(found) == 1 and "-" not in found:  # a file missing from every build is no match
            report.add(f"{name} reproducible", "yes, all three equal", command)
            continue
        report.add(f"{name} reproducible", "no", command)
        if name.endswith(".cpio.zst"):
            for label, other in list(builds.items())[1:]:
                differing = diff_archives(first / name, other / name)
                report.tables.append(f"Files that differ, cold build vs {label}:\n\n"
                                     + "\n".join(f"- `/{n}`" for n in differing[:50]))


def diff_archives(first: Path, second: Path) -> list[str]:
    """What differs: names whose content or mode differs (or that exist in only one archive),
    else names whose mtime differs, else a note that only the entry order differs."""
    import hashlib

    one, two = (list(cpio.members(cpio.decompress(p))) for p in (first, second))
    content = [{m.name: (m.mode, hashlib.sha256(m.data).hexdigest()) for m in side} for side in (one, two)]
    changed = sorted(n for n in content[0].keys() | content[1].keys() if content[0].get(n) != content[1].get(n))
    if changed:
        return changed
    times = [{m.name: m.mtime for m in side} for side in (one, two)]
    changed = sorted(f"{n} (mtime only)" for n in times[0] if times[0][n] != times[1].get(n))
    if changed:
        return changed
    if [m.name for m in one] != [m.name for m in two]:
        return ["(same files and contents, in a different order)"]
    return []


# --- the verb -----------------------------------------------------------------------------------

def run(cfg: Config, only: tuple[str, ...], runs: int, output: Path | None, workflow_file: Path) -> Report:
    unknown = set(only) - set(SECTIONS)
    if unknown:
        raise CaptainError(f"unknown benchmark section(s): {', '.join(sorted(unknown))}",
                           f"choose from: {', '.join(SECTIONS)}")
    initramfs = cfg.out_dir / artifacts.initramfs_name(cfg.arch)
    vmlinuz = cfg.out_dir / artifacts.vmlinuz_name(cfg.arch)
    needs_image = {"size", "boot", "netboot", "ram", "fleet", "nics"} & set(only)
    if needs_image and not initramfs.is_file():
        raise CaptainError(f"{initramfs} does not exist", "build first: ./build.py")
    report = Report()
    failed: list[str] = []
    # Files a section makes besides its numbers (the boot plot) go next to --output.
    artifacts_dir = output.parent if output is not None else cfg.build_dir / "bench"
    with tempfile.TemporaryDirectory(prefix="captainos-bench-") as tmp:
        workdir = Path(tmp)
        for section in only:
            with log.stage(f"bench {section}"):
                if section == "size":
                    size(report, initramfs, vmlinuz)
                elif section == "boot":
                    boot(report, cfg, vmlinuz, initramfs, runs, workdir, workflow_file, artifacts_dir)
                elif section == "netboot":
                    netboot(report, cfg, runs, workdir, workflow_file)
                elif section == "ram":
                    ram_floor(report, cfg, workdir, workflow_file, vmlinuz, initramfs)
                elif section == "build":
                    build_times(report, cfg, workdir)
                elif section == "repro":
                    reproducibility(report, cfg, workdir)
                elif section == "fleet":
                    failed += fleet(report, cfg, workdir, workflow_file)
                elif section == "nics":
                    nics(report, cfg, runs, workdir, workflow_file)
    text = report.markdown(cfg)
    if output is not None:
        cache.atomic_write(output, text)
    print(text)
    if failed:
        raise CaptainError(f"{len(failed)} fleet machine(s) did not succeed: {'; '.join(failed)}",
                           "the report above has each machine's marks")
    return report
