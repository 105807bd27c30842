"""The `qemu-test --workflow` harness: one VM against our model workflow server, over QEMU user networking.

    with Harness(cfg, Plan(workflow=Path("examples/workflow.yaml"), kernel=..., initrd=...)) as harness:
        run = harness.run()
        print(run.report())

A Harness starts a TLS registry (and an htpasswd one when the plan asks for credentials), pushes
the agent image (the real agent, built by agent.py, packaged by oci.py) and a busybox action
image (vm.images), starts the model workflow server (workflow.py: the real server's rules, not
the real server) and a syslog receiver, then boots the CaptainOS kernel and initramfs in QEMU
with the Tinkerbell command line, waits until the workflow succeeds, fails or times out, powers
the VM off and returns a vm.Run: the server's records, the syslog stream, the serial console
with host-side timestamps, and a timeline. The real-Tinkerbell lab (lab.py, `Lab`) netboots
VMs through Smee and the real tink server instead; both share vm.py.

The registries use the harness CA (`<cache>/e2e-ca/ca.pem`), which the image must trust:
build it with `--profiles test --extra-ca-certs <cache>/e2e-ca/ca.pem`.
"""

from __future__ import annotations

import json
import re
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from captainos.core import log
from captainos.core.config import Config
from captainos.core.errors import CaptainError
from captainos.core.run import Runner
from captainos.lab import oci, qemu, registry, syslogd, vm, workflow
from captainos.stages import artifacts

GUEST_HOST = "10.0.2.2"  # the host, as QEMU user networking shows it to the guest


@dataclass(frozen=True)
class Plan:
    """One end-to-end run."""

    workflow: Path
    kernel: Path
    initrd: Path
    agent_auth: bool = False  # agent image only in the htpasswd registry, found via docker_registry=
    username: str = "captain"
    password: str = field(default="", repr=False)  # generated when empty
    registry_delay: float = 0.0  # start the registry this long after QEMU
    long_poll: float = 60.0
    timeout: float = 1200.0  # boot + pull + whole workflow
    settle: float = 8.0  # keep the VM up this long after the end, for the last logs to arrive
    poweroff_timeout: float = 60.0  # wait this long for an ACPI power-off before quitting QEMU
    disk_size: str = "64M"
    # Give up early when the console or the syslog stream shows one of these (nothing will come).
    fail_patterns: tuple[str, ...] = (r"Dependency failed for tink-agent\.service", r"Kernel panic - not syncing")
    insecure: bool = False  # add insecure_registries=<registry> (for images that do not trust the CA)
    mac: str = qemu.DEFAULT_MAC
    append: str = ""  # extra kernel parameters; "{registry}" becomes the open registry's guest address
    agent_image: str = ""  # tink_worker_image= instead of the open registry's agent (same placeholder)
    forward_ssh: int = 0  # host port forwarded to the guest's port 22 (127.0.0.1 only)
    # Called with the Harness once the workflow is final, before the power-off (the VM still runs).
    on_done: Callable[[Harness], None] | None = None


@dataclass(frozen=True)
class Cmdline:
    """The Tinkerbell parameters the harness sends (console= and audit= come from qemu.py)."""

    grpc_authority: str
    worker_id: str
    syslog_port: int
    agent_image: str = ""  # tink_worker_image=; empty with docker_registry
    docker_registry: str = ""
    username: str = ""
    password: str = field(default="", repr=False)
    extra: str = ""

    def render(self) -> str:
        parts = []
        if self.agent_image:
            parts.append(f"tink_worker_image={self.agent_image}")
        if self.docker_registry:
            parts.append(f"docker_registry={self.docker_registry}")
        if self.username:
            parts += [f"registry_username={self.username}", f"registry_password={self.password}"]
        parts += [f"grpc_authority={self.grpc_authority}", f"worker_id={self.worker_id}", "tinkerbell_tls=false",
                  f"syslog_host={GUEST_HOST}", f"syslog_port={self.syslog_port}", "facility=onprem",
                  f"hw_addr={self.worker_id}", *vm.TEST_PROFILE_ARGS]
        return " ".join(parts + ([self.extra] if self.extra else []))


def secret_leaks(result: vm.Run, records_json: str, secret: str) -> list[str]:
    """Every place a secret shows up: serial lines, syslog messages, server records."""
    if not secret:
        return []
    places = [f"serial: {line.replace(secret, '***')}" for _, line in result.console if secret in line]
    places += [f"syslog from {m.hostname}/{m.app}: {m.msg.replace(secret, '***')}" for m in result.syslog
               if secret in m.raw]
    if secret in records_json:
        places.append("workflow server records")
    return places


# ---------------------------------------------------------------------------------------------
# The harness


class Harness:
    """Everything a VM needs to be provisioned against the model server; `run()` boots it once."""

    def __init__(self, cfg: Config, plan: Plan, *, workdir: Path | None = None, runner: Runner | None = None,
                 keep: bool = False) -> None:
        self.cfg = cfg
        self.plan = plan
        self.runner = runner or Runner()
        self._tmp = workdir is None
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="captainos-e2e-"))
        self.keep = keep
        self.password = plan.password or secrets.token_urlsafe(18)
        self.registries: list[registry.Registry] = []
        self.server: workflow.Server | None = None
        self.syslog: syslogd.Receiver | None = None
        self.guest: qemu.Guest | None = None
        self.console: vm.Console | None = None
        self.open_registry: registry.Registry | None = None
        self.auth_registry: registry.Registry | None = None
        self.wf: workflow.Workflow | None = None

    # --- setup --------------------------------------------------------------------------------
    def __enter__(self) -> Harness:
        try:
            self._setup()
        except BaseException:
            self._teardown()
            raise
        return self

    def _setup(self) -> None:
        for path in (self.plan.kernel, self.plan.initrd):
            if not path.is_file():
                raise CaptainError(f"{path} does not exist", "build the image first: ./build.py --profiles test "
                                   f"--extra-ca-certs {self.cfg.cache_dir / 'e2e-ca' / 'ca.pem'}")
        ca = registry.ensure_ca(self.cfg.cache_dir, self.runner)
        layouts = vm.images(self.cfg, self.runner)
        self.open_registry = registry.Registry(ca, self.workdir, "registry", runner=self.runner).start()
        self.registries.append(self.open_registry)
        reg = self.open_registry
        oci.push(self.runner, layouts / "busybox", vm.ACTION_TAG,
                 f"{reg.host_address}/{vm.ACTION_REPO}:{vm.ACTION_TAG}", cert_dir=reg.cert_dir)
        if self.plan.agent_auth:
            creds = oci.Credentials(self.plan.username, self.password)
            self.auth_registry = registry.Registry(ca, self.workdir, "registry-auth", creds=creds,
                                                   runner=self.runner).start()
            self.registries.append(self.auth_registry)
            auth = self.auth_registry
            oci.push(self.runner, layouts / "agent", vm.AGENT_TAG, f"{auth.host_address}/{vm.AGENT_REPO}:latest",
                     cert_dir=auth.cert_dir, creds=creds)
        else:
            oci.push(self.runner, layouts / "agent", vm.AGENT_TAG,
                     f"{reg.host_address}/{vm.AGENT_REPO}:{vm.AGENT_TAG}", cert_dir=reg.cert_dir)
        if self.plan.registry_delay > 0:
            for each in self.registries:
                each.stop()  # same port and storage when it comes back
        variables = {"worker_id": self.plan.mac, "device_1": self.plan.mac, "registry": reg.guest_address,
                     "action_image": f"{reg.guest_address}/{vm.ACTION_REPO}:{vm.ACTION_TAG}"}
        self.wf = workflow.load(self.plan.workflow, variables)
        self.server = workflow.Server((self.wf,), self.cfg.cache_dir, long_poll=self.plan.long_poll,
                                      bind="127.0.0.1").start()
        self.syslog = syslogd.Receiver(bind="127.0.0.1").start()
        self.disk = self.workdir / "disk.img"
        self.runner.run(["qemu-img", "create", "-q", "-f", "raw", str(self.disk), self.plan.disk_size])

    def cmdline(self) -> Cmdline:
        assert self.server is not None and self.syslog is not None and self.open_registry is not None
        grpc, port = f"{GUEST_HOST}:{self.server.port}", self.syslog.port
        extra = self.plan.append.replace("{registry}", self.open_registry.guest_address)
        if self.plan.insecure:
            extra = f"{extra} insecure_registries={','.join(r.guest_address for r in self.registries)}".strip()
        if self.auth_registry is not None:
            # The kernel echoes its whole command line at notice level; Debian's prebuilt kernel
            # shows notices on the console, so an operator passing credentials adds loglevel=4
            # (README, "Security notes"). Our compiled kernels hide notices by default.
            extra = f"loglevel=4 {extra}".strip()
            return Cmdline(grpc, self.plan.mac, port, docker_registry=self.auth_registry.guest_address,
                           username=self.plan.username, password=self.password, extra=extra)
        agent_image = (self.plan.agent_image.replace("{registry}", self.open_registry.guest_address)
                       or f"{self.open_registry.guest_address}/{vm.AGENT_REPO}:{vm.AGENT_TAG}")
        return Cmdline(grpc, self.plan.mac, port, agent_image=agent_image, extra=extra)

    def machine(self) -> qemu.Machine:
        accel = qemu.resolve_accel(self.cfg.arch, self.cfg.qemu_accel, self.plan.kernel)
        forward = f",hostfwd=tcp:127.0.0.1:{self.plan.forward_ssh}-:22" if self.plan.forward_ssh else ""
        return qemu.Machine(self.cfg.arch, kernel=self.plan.kernel, initrd=self.plan.initrd,
                            netdev=f"user,id=net0{forward}",
                            append=self.cmdline().render(), mem=self.cfg.qemu_mem, smp=self.cfg.qemu_smp,
                            accel=accel, serial_log=self.workdir / "serial.log", mac=self.plan.mac,
                            disks=(self.disk,), monitor=self.workdir / "monitor.sock")

    # --- the run -------------------------------------------------------------------------------
    def run(self) -> vm.Run:
        assert self.server is not None and self.wf is not None and self.syslog is not None
        machine = self.machine()
        log.info(f"==> booting {self.plan.initrd.name} ({machine.accel.value}), workflow {self.wf.id}")
        self.guest = qemu.Guest(machine, workdir=self.workdir / "qemu", secrets=(self.password,))
        self.guest.start()
        started = time.time()
        self.console = vm.Console(machine.serial_log or self.workdir / "serial.log").start()
        delayed = self.plan.registry_delay > 0
        deadline = time.monotonic() + self.plan.timeout
        state = self.server.state(self.wf.id)
        seen = 0
        while state not in workflow.FINAL:
            if delayed and time.time() - started >= self.plan.registry_delay:
                log.info(f"    starting the registries {time.time() - started:.0f}s after QEMU")
                for reg in self.registries:
                    reg.start()
                delayed = False
            if self.guest.proc is not None and self.guest.proc.poll() is not None:
                raise CaptainError(f"QEMU exited with code {self.guest.proc.returncode} before the workflow ended",
                                   "see the diagnostics above")
            if time.monotonic() > deadline:
                raise CaptainError(f"workflow {self.wf.id} still {state} after {self.plan.timeout:.0f}s")
            fatal = self._fatal()
            if fatal:
                raise CaptainError(f"workflow {self.wf.id} cannot run: the guest said {fatal!r}")
            state = self.server.wait_done(self.wf.id, 2.0)
            seen = self._progress(seen, started)
        log.info(f"    workflow {self.wf.id}: {state} after {time.time() - started:.0f}s")
        if self.plan.on_done is not None:
            self.plan.on_done(self)
        time.sleep(self.plan.settle)
        self.power_off()
        self.console.stop()
        result = vm.Run(name=self.wf.id, state=state, console=list(self.console.lines), syslog=self.syslog.snapshot(),
                        started=started, disk=self.disk, records=self.server.snapshot())
        result.timeline = vm.timeline(result)
        return result

    def _fatal(self) -> str | None:
        """The first console line or syslog message matching a fail pattern."""
        assert self.console is not None and self.syslog is not None
        texts = [line for _, line in list(self.console.lines)] + [m.msg for m in self.syslog.snapshot()]
        for pattern in self.plan.fail_patterns:
            regex = re.compile(pattern)
            hit = next((text for text in texts if regex.search(text)), None)
            if hit is not None:
                return hit.strip()
        return None

    def _progress(self, seen: int, started: float) -> int:
        """Log the server records that arrived since the last call; return how many there are now."""
        assert self.server is not None
        records = self.server.snapshot()
        for rec in records[seen:]:
            when = (vm.stamp(rec["time"]) or started) - started
            what = "sent" if rec["kind"] == "served" else rec["state"]
            log.info(f"    {when:6.1f}s  action {rec['action']}: {what}")
        return len(records)

    def power_off(self) -> None:
        """ACPI power button first (a clean shutdown), QEMU's quit if the guest ignores it."""
        guest = self.guest
        if guest is None or guest.proc is None or guest.proc.poll() is not None:
            return
        try:
            guest.monitor("system_powerdown")
            guest.wait_exit(self.plan.poweroff_timeout)
        except (CaptainError, OSError):
            log.warn(f"the guest did not power off within {self.plan.poweroff_timeout:.0f}s; quitting QEMU")
            try:
                guest.monitor("quit")
                guest.wait_exit(15)
            except (CaptainError, OSError):
                guest.kill()

    # --- diagnostics and teardown -----------------------------------------------------------------
    def diagnostics(self, lines: int = 60) -> str:
        parts = []
        if self.guest is not None:
            parts.append(f"--- serial console (last {lines} lines; {self.guest.serial_log}) ---\n"
                         + self.guest.tail(lines))
        if self.server is not None:
            parts.append("--- workflow server records ---\n" + json.dumps(self.server.snapshot(), indent=1))
        if self.syslog is not None:
            tail = self.syslog.snapshot()[-20:]
            parts.append("--- syslog (last 20) ---\n" + "\n".join(f"{m.hostname} {m.app}: {m.msg}" for m in tail))
        for reg in self.registries:
            parts.append(f"--- {reg.name} log without the harness's own pushes ({reg.log_file}) ---\n"
                         + reg.log_tail(20, skip="skopeo/"))
        text = "\n".join(parts)
        return text.replace(self.password, "***") if self.password else text

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc is not None and not isinstance(exc, KeyboardInterrupt):
            log.error(f"end-to-end run failed: {exc}\n{self.diagnostics()}")
        self._teardown()
        if exc is not None:
            log.info(f"    kept the run's files in {self.workdir}")
        elif self._tmp and not self.keep:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def _teardown(self) -> None:
        if self.console is not None:
            self.console.stop()
        if self.guest is not None:
            self.guest.kill()
        if self.server is not None:
            self.server.dump(self.workdir / "records.json")
            self.server.stop()
        if self.syslog is not None:
            self.syslog.stop()
        for reg in self.registries:
            reg.stop()


# ---------------------------------------------------------------------------------------------
# `./build.py qemu-test --workflow FILE`


def run_workflow_file(cfg: Config, path: Path | str, *, kernel: Path | None = None,
                      initrd: Path | None = None) -> vm.Run:
    """Provision a VM booted from out/ with the workflow in path; raise unless it succeeds."""
    kernel = kernel or cfg.out_dir / artifacts.vmlinuz_name(cfg.arch)
    initrd = initrd or cfg.out_dir / artifacts.initramfs_name(cfg.arch)
    plan = Plan(workflow=Path(path), kernel=kernel, initrd=initrd)
    with Harness(cfg, plan) as harness:
        result = harness.run()
        log.info(result.report())
        if result.state != "SUCCESS":
            log.error(harness.diagnostics())
    if result.state != "SUCCESS":
        raise CaptainError(f"workflow {result.name} ended {result.state}",
                           "the agent log above shows the failing action")
    return result
