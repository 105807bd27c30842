"""QEMU: a pure argv builder per architecture, an accelerator probe, and a Guest runner.

`argv()` is the only place a QEMU command line is assembled; tests assert on it directly.
`Guest` starts QEMU with the serial console in a log file and lets a caller wait for
lines on it, talk to the human monitor, and collect the exit status.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from captainos.core import log, run
from captainos.core.config import Accel, Arch, Config
from captainos.core.errors import CaptainError
from captainos.core.run import base_env
from captainos.lab import boots

ALWAYS_APPEND = "audit=0"
DEFAULT_MAC = "52:54:00:12:34:56"


@dataclass(frozen=True)
class Machine:
    """Everything that decides a QEMU command line."""

    arch: Arch
    kernel: Path | None = None  # None: boot from firmware (cdrom/disk)
    initrd: Path | None = None
    append: str = ""  # extra kernel command line, after the console and audit settings
    default_console: bool = True  # console=<the arch's first serial port> first; False: only append's
    mem: str = "2G"
    smp: int = 2
    accel: Accel = Accel.TCG  # resolve AUTO with probe_accel() first
    serial_log: Path | None = None  # None: serial console on stdio (interactive)
    mac: str = DEFAULT_MAC
    netdev: str = "user,id=net0"  # -netdev value; must define id=net0
    disks: tuple[Path, ...] = ()  # raw disk images as virtio-blk
    cdrom: Path | None = None
    firmware: Path | None = None  # UEFI firmware: -bios image, or the pflash code with firmware_vars
    firmware_vars: Path | None = None  # a writable copy of the UEFI variable store (pflash unit 1)
    secure_boot: bool = False  # SMM + secure pflash, as OVMF's Secure Boot build requires (amd64)
    monitor: Path | None = None  # unix socket for the human monitor
    serial_socket: Path | None = None  # the first serial port also takes input: a unix socket (Guest.type)
    serial2_log: Path | None = None  # a second serial port (ttyS1: where Smee's command line puts the console)
    net_boot: bool = False  # the NIC is the first boot device (its option ROM's iPXE netboots)
    nic_slot: int = 0  # the NIC's PCI slot (0: QEMU's next free one); a high one lets NICs in extra come first
    reboot: bool = False  # a guest reboot restarts the machine (default: QEMU exits, -no-reboot)
    netns: str = ""  # run QEMU inside this network namespace (the lab's tap devices live there)
    extra: tuple[str, ...] = field(default_factory=tuple)


def kernel_cmdline(machine: Machine) -> str:
    """console=<serial> (unless default_console is off) and audit=0; the caller's append last."""
    console = f"console={machine.arch.serial_console()}" if machine.default_console else ""
    parts = [console, ALWAYS_APPEND, machine.append.strip()]
    return " ".join(p for p in parts if p)


def argv(machine: Machine) -> list[str]:
    """The full QEMU command line for a machine (pure: no probing, no filesystem access)."""
    arch = machine.arch
    if machine.accel is Accel.AUTO:
        raise ValueError("resolve Accel.AUTO with probe_accel() before building the argv")
    machine_type = arch.qemu_machine() + (",smm=on" if machine.secure_boot else "")
    # Single-threaded TCG: with one host thread per vCPU (QEMU 7.2), an x86 guest kernel that
    # patches its own code (text_poke, int3) can hit a stale breakpoint on another vCPU and
    # oops ("Oops: int3" in a static-key function, seen here once in ~80 boots). One thread
    # round-robins the vCPUs and never races; boots take about 1.5x longer.
    accel = "tcg,thread=single" if machine.accel is Accel.TCG else machine.accel.value
    cmd = ["ip", "netns", "exec", machine.netns] if machine.netns else []
    cmd += [arch.qemu_binary(), "-machine", machine_type, "-accel", accel,
            "-m", machine.mem, "-smp", str(machine.smp), "-nographic"]
    if not machine.reboot:
        cmd.append("-no-reboot")
    if arch is Arch.ARM64:
        cmd += ["-cpu", "host" if machine.accel is Accel.KVM else "max"]
    elif machine.accel is Accel.KVM:
        cmd += ["-cpu", "host"]
    if machine.secure_boot:
        cmd += ["-global", "driver=cfi.pflash01,property=secure,value=on"]
    if machine.firmware is not None and machine.firmware_vars is not None:
        cmd += ["-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={machine.firmware}",
                "-drive", f"if=pflash,format=raw,unit=1,file={machine.firmware_vars}"]
    elif machine.firmware is not None:
        cmd += ["-bios", str(machine.firmware)]
    if machine.kernel is not None:
        cmd += ["-kernel", str(machine.kernel), "-append", kernel_cmdline(machine)]
        if machine.initrd is not None:
            cmd += ["-initrd", str(machine.initrd)]
    nic = f"virtio-net-pci,netdev=net0,mac={machine.mac}" + (",bootindex=0" if machine.net_boot else "")
    nic += f",addr={machine.nic_slot:#x}" if machine.nic_slot else ""
    cmd += ["-netdev", machine.netdev, "-device", nic]
    for index, disk in enumerate(machine.disks):
        cmd += ["-drive", f"file={disk},format=raw,if=none,id=disk{index}",
                "-device", f"virtio-blk-pci,drive=disk{index},serial=captainos{index}"]
    if machine.cdrom is not None:
        cmd += ["-drive", f"file={machine.cdrom},media=cdrom,readonly=on,if=none,id=cd0",
                "-device", "virtio-scsi-pci,id=scsi0", "-device", "scsi-cd,drive=cd0,bootindex=0"]
    cmd += ["-device", "virtio-rng-pci"]
    if machine.serial_log is not None:
        if machine.serial_socket is not None:
            # The output still goes to the log file (logfile=), whether or not a client is connected.
            cmd += ["-chardev", f"socket,id=serial0,path={machine.serial_socket},server=on,wait=off,"
                                f"logfile={machine.serial_log}", "-serial", "chardev:serial0"]
        else:
            cmd += ["-serial", f"file:{machine.serial_log}"]
        if machine.serial2_log is not None:
            cmd += ["-serial", f"file:{machine.serial2_log}"]
        monitor = f"unix:{machine.monitor},server=on,wait=off" if machine.monitor else "none"
        cmd += ["-monitor", monitor]
    elif machine.monitor is not None:
        raise ValueError("a monitor socket needs a serial log file (stdio is the serial console)")
    return cmd + list(machine.extra)


def probe_accel(arch: Arch, kernel: Path | None = None, timeout: float = 20.0) -> Accel:
    """KVM when /dev/kvm is usable *and* a guest really runs under it, else TCG.

    Some hosts expose /dev/kvm and start firmware under it, yet hang Linux guests. So the
    probe boots the kernel under test (no initramfs: it must reach its "unable to mount
    root" panic, which QEMU turns into an exit through -no-reboot) within a hard timeout.
    """
    if not arch.is_host() or not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return Accel.TCG
    if kernel is None:
        log.info("    no kernel to probe KVM with: using TCG")
        return Accel.TCG
    with tempfile.TemporaryDirectory(prefix="captainos-kvm-probe-") as tmp:
        serial = Path(tmp) / "serial.log"
        machine = Machine(arch, kernel=kernel, append="panic=-1", accel=Accel.KVM, mem="256M", smp=1,
                          serial_log=serial)
        proc = run.spawn(argv(machine), Path(tmp) / "qemu.log")
        code = run.wait(proc, timeout)
        if code is None:
            run.stop(proc, grace=0)
        text = serial.read_text(errors="replace") if serial.exists() else ""
        failure = (Path(tmp) / "qemu.log").read_text(errors="replace").strip().splitlines()
    if "Kernel panic" in text or "VFS:" in text:
        return Accel.KVM
    why = (f"did not boot a kernel within {timeout:.0f}s" if code is None
           else f"failed (QEMU exited with code {code}{': ' + failure[0] if failure else ''})")
    log.info(f"    KVM {why} here: using TCG (software emulation)")
    return Accel.TCG


def resolve_accel(arch: Arch, accel: Accel, kernel: Path | None = None) -> Accel:
    return probe_accel(arch, kernel) if accel is Accel.AUTO else accel


class Guest:
    """A running QEMU guest whose serial console goes to a log file.

        with Guest(machine) as guest:
            guest.wait_for(r"CAPTAINOS-SELFTEST: (PASS|FAIL.*)", timeout=300)
            guest.monitor("system_powerdown")
            guest.wait_exit(60)
    """

    def __init__(self, machine: Machine, workdir: Path | None = None, secrets: tuple[str, ...] = ()) -> None:
        self.secrets = tuple(s for s in secrets if s)  # masked in the logged command line
        self._tmp = None if workdir else tempfile.TemporaryDirectory(prefix="captainos-qemu-")
        self.workdir = workdir or Path(self._tmp.name)  # type: ignore[union-attr]
        self.workdir.mkdir(parents=True, exist_ok=True)
        serial = machine.serial_log or self.workdir / "serial.log"
        monitor = machine.monitor or self.workdir / "monitor.sock"
        self.machine = Machine(**{**machine.__dict__, "serial_log": serial, "monitor": monitor})
        self.serial_log = serial
        self.proc: run.Process | None = None
        self.started = 0.0
        self._offset = 0
        self._test = ""  # the test that started it (captainos.lab.boots)
        self._recorded = False

    def __enter__(self) -> Guest:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.kill()
        if self._tmp is not None and exc is None:
            self._tmp.cleanup()

    def start(self) -> None:
        self.serial_log.write_bytes(b"")
        self.started = time.monotonic()
        self._test = boots.current_test()
        self._recorded = False
        self.proc = run.spawn(argv(self.machine), self.workdir / "qemu.stderr", secret=self.secrets, truncate=True)

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def serial(self) -> str:
        return self.serial_log.read_bytes().decode(errors="replace") if self.serial_log.exists() else ""

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.serial().splitlines()[-lines:])

    def wait_for(self, pattern: str, timeout: float, *, from_start: bool = False) -> re.Match[str]:
        """Wait until a regex matches the serial output (after the previous match)."""
        regex = re.compile(pattern, re.MULTILINE)
        deadline = time.monotonic() + timeout
        if from_start:
            self._offset = 0
        while True:
            text = self.serial()
            match = regex.search(text, self._offset)
            if match:
                self._offset = match.end()
                return match
            if self.proc is not None and self.proc.poll() is not None:
                raise CaptainError(f"QEMU exited ({self.proc.returncode}) before /{pattern}/ appeared; "
                                   f"serial tail:\n{self.tail()}\n{self._stderr()}")
            if time.monotonic() > deadline:
                raise CaptainError(f"timed out after {timeout:.0f}s waiting for /{pattern}/; "
                                   f"serial tail:\n{self.tail()}")
            time.sleep(0.25)

    def monitor(self, command: str) -> str:
        """Send one human-monitor command and return what the monitor answered."""
        assert self.machine.monitor is not None
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect(str(self.machine.monitor))
            sock.sendall(command.encode() + b"\n")
            time.sleep(0.5)
            chunks = []
            with contextlib.suppress(TimeoutError, OSError):
                sock.settimeout(0.5)
                while data := sock.recv(65536):
                    chunks.append(data)
        return b"".join(chunks).decode(errors="replace")

    def type(self, text: str) -> None:
        """Send text to the first serial port, as if typed (the machine needs serial_socket)."""
        if self.machine.serial_socket is None:
            raise ValueError("typing on the console needs a machine with serial_socket")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect(str(self.machine.serial_socket))
            sock.sendall(text.encode())
            time.sleep(0.5)  # let QEMU read it before the connection closes

    def wait_exit(self, timeout: float) -> int:
        assert self.proc is not None
        code = run.wait(self.proc, timeout)
        if code is None:
            raise CaptainError(f"QEMU still running {timeout:.0f}s later; serial tail:\n{self.tail()}")
        self._record()
        return code

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self._record()

    def _record(self) -> None:
        """One line in the boot log (captainos.lab.boots), once per start."""
        if self.proc is None or self._recorded:
            return
        self._recorded = True
        m = self.machine
        kind = "kernel" if m.kernel else "netboot" if m.net_boot else "cdrom" if m.cdrom else "disk"
        label = self.workdir.parent.name if self.workdir.name == "qemu" else self.workdir.name
        boots.record(boots.Boot(test=self._test, label="" if self._tmp else label, kind=kind, mem=m.mem,
                                seconds=round(self.elapsed(), 1)))

    def _stderr(self) -> str:
        path = self.workdir / "qemu.stderr"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""


def interactive(cfg: Config) -> None:
    """`qemu-test`: boot out/ artifacts with the serial console on this terminal."""
    from captainos.stages import artifacts

    kernel = cfg.out_dir / artifacts.vmlinuz_name(cfg.arch)
    initrd = cfg.out_dir / artifacts.initramfs_name(cfg.arch)
    for path in (kernel, initrd):
        if not path.is_file():
            raise CaptainError(f"{path} does not exist", "build it first: ./build.py")
    machine = Machine(cfg.arch, kernel=kernel, initrd=initrd, append=cfg.qemu_append, mem=cfg.qemu_mem,
                      smp=cfg.qemu_smp, accel=resolve_accel(cfg.arch, cfg.qemu_accel, kernel))
    cmd = argv(machine)
    log.info(f"booting {initrd.name} ({machine.accel.value}); quit with Ctrl-A X")
    log.debug(shlex.join(cmd))
    os.execvpe(cmd[0], cmd, base_env())
