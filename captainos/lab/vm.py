"""What both harnesses share about a provisioned VM: its images, its console, one result, one timeline.

The `qemu-test --workflow` harness (e2e.py: QEMU user networking, our model workflow server)
and the real-Tinkerbell lab (lab.py: netboot through Smee, the real tink server) push the same
agent and action images (`images()`), follow a serial console the same way (`Console`), read
the agent's JSON log lines the same way (`agent_json`), and return the same `Run`, whose
`timeline()` marks what that run shows: the netboot when it went through Smee, the OS's start,
the agent and the workflow in every run.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from captainos.core import cache, pins
from captainos.core.config import Config
from captainos.core.errors import CaptainError
from captainos.core.run import Runner
from captainos.lab import agent, kube, oci, syslogd
from captainos.sources import debian

AGENT_REPO = "tink-agent"
AGENT_TAG = pins.TINK_AGENT.version
ACTION_REPO = "actions/busybox"
ACTION_TAG = "e2e"
# The test profile's self-test powers the VM off when it is done: not during a workflow (an
# image without that profile ignores the parameter).
TEST_PROFILE_ARGS = ("captainos.selftest=off",)
AGENT_MESSAGES = ("starting Agent", "received action", "reported action status", "executed action",
                  "error executing action")
OS_UNITS = ("tink-agent", "tink-agent-setup")  # what CaptainOS forwards to syslog_host
FINAL = kube.FINAL  # a Workflow's final states, the model server's and the real one's alike
PRINTK = r"^\[\s*\d+\.\d+\]"  # a kernel console line with its timestamp
# The OS's steps on its console: the first line matching each.
OS_MARKS = (
    ("/init starts systemd", r'"prog":"init".*starting systemd'),
    ("systemd up", r"systemd\[1\]|systemd \d+ running|Welcome to"),
    # Only the start-up line: shutdown prints "Stopped target network-online.target" too.
    ("network up", r"Reached target .*Network is Online"),
)


# ---------------------------------------------------------------------------------------------
# Images


def action_busybox(cfg: Config, runner: Runner) -> Path:
    """The busybox of the action image: the host's (Debian's busybox-static) when the guest
    has the host's architecture, else Debian's busybox-static for the guest's, from the signed
    archive (cached by the package's digest)."""
    if cfg.arch.is_host():
        return oci.BUSYBOX
    deb = debian.package("busybox-static", cfg.arch.value, cache_dir=cfg.cache_dir)

    def produce(work: Path) -> None:
        debian.extract(runner, deb, work / "root")

    entry = cache.cached(cfg.cache_dir, "busybox", cfg.arch.value, {"deb": cache.sha256_file(deb)}, force=False,
                         produce=produce)
    found = [p for p in (entry / "root/usr/bin/busybox", entry / "root/bin/busybox") if p.is_file()]
    if not found:
        raise CaptainError(f"{deb.name} holds no busybox binary")
    return found[0]


def images(cfg: Config, runner: Runner) -> Path:
    """Cache entry with OCI layouts `agent/` (tag AGENT_TAG) and `busybox/` (tag ACTION_TAG)."""
    agent_entry = agent.build(cfg, runner)
    binary = agent_entry / agent.BINARY
    busybox = action_busybox(cfg, runner)
    parts = {"agent": cache.sha256_file(binary), "busybox": cache.sha256_file(busybox),
             "oci": cache.sha256_file(Path(oci.__file__)), "agent_tag": AGENT_TAG, "action_tag": ACTION_TAG}

    def produce(work: Path) -> None:
        oci.write_layout(oci.agent_image(binary, cfg.arch, AGENT_TAG), work / "agent", AGENT_TAG)
        oci.write_layout(oci.busybox_image(cfg.arch, busybox), work / "busybox", ACTION_TAG)

    return cache.cached(cfg.cache_dir, "e2e-images", cfg.arch.value, parts, force=False, produce=produce)


# ---------------------------------------------------------------------------------------------
# The serial console, with the host time each line appeared


class Console:
    """Follows the serial log file in a thread and timestamps each complete line (wall clock)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lines: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="console", daemon=True)

    def start(self) -> Console:
        self._thread.start()
        return self

    def _follow(self) -> None:
        offset, partial = 0, b""
        while not self._stop.is_set():
            if self.path.exists():
                with self.path.open("rb") as handle:
                    handle.seek(offset)
                    data = handle.read()
                offset += len(data)
                *complete, partial = (partial + data).split(b"\n")
                now = time.time()
                self.lines.extend((now, line.decode(errors="replace").rstrip("\r")) for line in complete)
            self._stop.wait(0.2)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)


def first_line(lines: list[tuple[float, str]], pattern: str) -> tuple[float, str] | None:
    """The first (time, line) matching pattern."""
    regex = re.compile(pattern)
    return next(((t, line) for t, line in lines if regex.search(line)), None)


def agent_json(text: str) -> dict[str, Any] | None:
    """The agent's JSON log line in a console line or syslog message, when its msg is one of
    AGENT_MESSAGES: from `{"time"` on (the agent's own key order, after any prefix), else the
    whole text (Smee logs the object it received with its keys sorted, and the lab re-encodes it)."""
    if '"msg"' not in text:
        return None
    start = text.find('{"time"')
    candidate = text[start:] if start >= 0 else text.strip()
    if not candidate.startswith("{"):
        return None
    try:
        obj = json.loads(candidate)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) and obj.get("msg") in AGENT_MESSAGES else None


def stamp(text: str) -> float | None:
    """Seconds since the epoch of an ISO 8601 time ("Z" or an offset); None if it is not one."""
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except (TypeError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------
# One provisioning run, whichever harness made it


@dataclass
class Run:
    """What one VM's provisioning produced. Every run has the common fields; the real lab also
    fills its Workflow object, events, Smee's records, the firmware console and the HTTP lines
    (and what an other-network or IPv6 scenario found); the model server fills its records."""

    name: str  # the workflow's id (the model server) or the Workflow object's name (the lab)
    state: str
    console: list[tuple[float, str]]  # the OS console: the harness's one serial port, ttyS1 in the lab
    syslog: list[syslogd.Message]  # as the harness's receiver or Smee's got them (received: host time)
    started: float  # wall clock when QEMU started: the VM's power-on
    disk: Path
    timeline: list[tuple[str, float | None]] = field(default_factory=list)
    records: list[dict[str, Any]] = field(default_factory=list)  # the model server's (workflow.Server.snapshot)
    mac: str = ""  # the lab's: the VM's boot NIC
    index: int = 0  # the lab's VM number
    workflow: dict[str, Any] = field(default_factory=dict)  # the lab's Workflow object, read back
    events: list[dict[str, Any]] = field(default_factory=list)  # Kubernetes events of its Hardware and Workflow
    smee: list[dict[str, Any]] = field(default_factory=list)  # Tinkerbell log records from power-on on
    firmware_console: list[tuple[float, str]] = field(default_factory=list)  # ttyS0 in the lab: SeaBIOS/OVMF, iPXE
    http: list[tuple[float, str]] = field(default_factory=list)  # the artifact servers' request lines
    other: dict[str, Any] = field(default_factory=dict)  # the other network's findings (other.Other.probe)
    ipv6: dict[str, Any] = field(default_factory=dict)  # an IPv6 scenario's findings (watch6 counters, addresses)

    @property
    def serial(self) -> str:
        return "\n".join(line for _, line in self.console)

    @property
    def netboot(self) -> bool:
        """The run went through Smee (its records) or fetched the OS from an artifact server."""
        return bool(self.smee or self.http)

    def reports(self) -> list[tuple[str, str]]:
        """(action name, state) of every status report the model server recorded, in order."""
        return [(r["action"], r["state"]) for r in self.records if r["kind"] == "report"]

    def served(self) -> list[str]:
        """The actions the model server handed out, in order."""
        return [r["action"] for r in self.records if r["kind"] == "served"]

    def actions(self) -> list[tuple[str, str]]:
        """(action name, state) of each action of the lab's Workflow object."""
        return kube.action_states(self.workflow)

    def os_syslog(self) -> list[syslogd.Message]:
        """The messages of CaptainOS's forwarded units (iPXE logs to Smee too, before the OS)."""
        return [m for m in self.syslog if m.app in OS_UNITS]

    def agent_lines(self) -> list[tuple[float, dict[str, Any]]]:
        """The agent's JSON log lines that reached syslog (else the console), as (time, object)."""
        found = [(m.received, obj) for m in self.syslog if (obj := agent_json(m.msg)) is not None]
        if not found:
            found = [(t, obj) for t, line in self.console if (obj := agent_json(line)) is not None]
        return found

    def report(self) -> str:
        """The run for a person: the actions as the Workflow object has them (the lab), else the
        agent's own log of them; the timeline; an other-network or IPv6 scenario's findings."""
        head = f"workflow {self.name}" + (f" ({self.mac})" if self.mac else "") + f": {self.state}"
        if self.workflow:
            found = ", ".join(f"{k}={v}" for k, v in kube.conditions(self.workflow).items()) or "none"
            lines = [f"{head}; conditions: {found}", "actions:"]
            lines += [f"  {name:<24} {state}" for name, state in self.actions()]
        else:
            lines = [head, "agent log:"]
            for when, obj in self.agent_lines():
                action = obj.get("action") or {}
                detail = " ".join(f"{k}={v}" for k, v in (("action", action.get("name")), ("state", obj.get("state")),
                                                           ("error", obj.get("error"))) if v)
                lines.append(f"  {when - self.started:7.1f}s  {obj['msg']}  {detail}".rstrip().replace("\n", " | "))
        zero = self.timeline[0][0] if self.timeline else "QEMU started"
        lines.append(f"timeline (seconds after {zero}):")
        for label, mark in self.timeline:
            lines.append(f"  {label:<22} " + (f"{mark:7.1f}s" if mark is not None else "    -"))
        if self.other:
            lines.append("other network: " + ", ".join(f"{k}={v}" for k, v in self.other.items() if k != "queries"))
        if self.ipv6:
            lines.append("ipv6: " + ", ".join(f"{k}={v}" for k, v in self.ipv6.items()))
        return "\n".join(lines)


def timeline(run: Run) -> list[tuple[str, float | None]]:
    """When each step happened, in seconds after QEMU started (None: not seen).

    A run that went through Smee (`Run.netboot`) starts at "power on" with its netboot: DHCP
    answered, iPXE binary sent, iPXE script served (Smee's records), kernel fetched (the HTTP
    lines); any other run starts at "QEMU started". Every run then has the OS's steps from its
    consoles (kernel started, /init starts systemd, systemd up, network up), agent started, the
    first action and workflow done: by the model server's records when the run has them ("first
    action received": handed out), else by the agent's own lines ("first action started", and
    its last final report once the workflow is final). Times are the host's clock (when a line
    or message arrived), never the VM's: under TCG the guest's clock is not the host's.
    """
    def rel(when: float | None) -> float | None:
        return None if when is None else round(when - run.started, 1)

    def seen(pattern: str) -> tuple[float, str] | None:
        # The OS console first; the ISO's console set leaves the kernel's lines on the firmware's.
        return first_line(run.console, pattern) or first_line(run.firmware_console, pattern)

    marks: list[tuple[str, float | None]] = [("power on" if run.netboot else "QEMU started", 0.0)]
    if run.netboot:
        marks += _netboot(run, rel)
    # The kernel's own clock starts when it does: the first timestamped console line, minus
    # its timestamp, is when the kernel began (whatever its log level hides before that).
    printk = seen(PRINTK)
    kernel = None if printk is None else printk[0] - float(printk[1].split("]", 1)[0].strip("[ "))
    marks.append(("kernel started", rel(kernel)))
    os_steps: dict[str, float | None] = {}
    for label, pattern in OS_MARKS:
        hit = seen(pattern)
        os_steps[label] = None if hit is None else hit[0]
    # A syslog message from the OS proves its network was up when it arrived; the console's
    # line may come late, or never (systemd stops printing status once the getty owns it).
    # The OS's messages are those after the kernel started: iPXE logs to Smee before it, so a
    # netboot whose kernel start was not seen has none to go by.
    if kernel is not None:
        messages = [m.received for m in run.syslog if m.received >= kernel]
    else:
        messages = [] if run.netboot else [m.received for m in run.syslog]
    network = [t for t in (os_steps["network up"], min(messages, default=None)) if t is not None]
    os_steps["network up"] = min(network) if network else None
    marks += [(label, rel(when)) for label, when in os_steps.items()]
    agent = run.agent_lines()
    agent_start = next((t for t, obj in agent if obj.get("msg") == "starting Agent"), None)
    if agent_start is None:
        hit = first_line(run.console, r"starting Agent")
        agent_start = None if hit is None else hit[0]
    marks.append(("agent started", rel(agent_start)))
    if run.records:
        served = [stamp(r["time"]) for r in run.records if r["kind"] == "served"]
        finals = [stamp(r["time"]) for r in run.records if r["kind"] == "report" and r["workflow_state"] in FINAL]
        marks += [("first action received", rel(served[0]) if served else None),
                  ("workflow done", rel(finals[0]) if finals else None)]
    else:
        starts = [t for t, obj in agent if obj.get("msg") == "received action"]
        stops = [t for t, obj in agent if obj.get("msg") == "reported action status"
                 and obj.get("state") in ("success", "failure", "timeout")]
        marks += [("first action started", rel(min(starts)) if starts else None),
                  ("workflow done", rel(max(stops)) if stops and run.state in FINAL else None)]
    return marks


def _netboot(run: Run, rel: Callable[[float | None], float | None]) -> list[tuple[str, float | None]]:
    """The netboot's marks: Smee's DHCP answer to this MAC, its iPXE binary and script, the kernel's fetch."""
    def smee_first(pattern: str) -> float | None:
        regex = re.compile(pattern)
        for rec in run.smee:
            if regex.search(json.dumps(rec)):
                return stamp(str(rec.get("time", "")))
        return None

    mac = re.escape(run.mac.lower())
    ip = next((str(rec.get("ipAddress", "")) for rec in run.smee
               if rec.get("msg") == "sent DHCP response" and rec.get("mac") == run.mac.lower()), "")
    script = rf'"uri": "/ipxe/script/{mac}/auto\.ipxe"' if not ip else rf'auto\.ipxe".*"client": "{re.escape(ip)}"'
    fetched = first_line(run.http, r"GET /vmlinuz")
    return [
        ("DHCP answered", rel(smee_first(rf'"msg": "sent DHCP response", "mac": "{mac}"'))),
        ("iPXE binary sent", rel(smee_first(rf'"msg": "file served".*"filename": "{mac}/'))),
        ("iPXE script served", rel(smee_first(rf'"msg": "response".*{script}'))),
        ("kernel fetched", rel(None if fetched is None else fetched[0])),
    ]
