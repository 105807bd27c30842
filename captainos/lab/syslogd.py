"""A UDP syslog receiver for tests: parses RFC 5424 (and tolerates RFC 3164) and keeps every message.

CaptainOS forwards its journal to `syslog_host=`; the end-to-end harness points that at this
receiver and checks what arrives (agent and action logs, the VM's hostname, no secrets). In
the lab it runs as a process of its own on the lab's IPv6 addresses (Smee's receiver opens
IPv4 only), writing each message as a JSON line:

    python3 -m captainos.lab.syslogd --bind :: --port 514 --out FILE
"""

from __future__ import annotations

import argparse
import json
import re
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

NIL = "-"
_PRI = re.compile(r"^<(\d{1,3})>")
_3164_TIME = re.compile(r"^([A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d) ")
_TAG = re.compile(r"^([^\s:\[]{1,48})(?:\[([^\]]*)\])?:\s?")


@dataclass(frozen=True)
class Message:
    facility: int
    severity: int
    version: int  # 1 for RFC 5424, 0 for RFC 3164 / headerless
    timestamp: str
    hostname: str
    app: str
    procid: str
    msgid: str
    structured_data: str
    msg: str
    raw: str
    peer: str = ""
    received: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _nil(value: str) -> str:
    return "" if value == NIL else value


def _split_sd(text: str) -> tuple[str, str]:
    """(structured data, rest) where text starts with '-' or one or more [..] elements."""
    if text.startswith(NIL):
        return NIL, text[1:]
    pos = 0
    while pos < len(text) and text[pos] == "[":
        pos += 1
        in_quote = False
        while pos < len(text):
            char = text[pos]
            if char == "\\" and in_quote:
                pos += 2
                continue
            if char == '"':
                in_quote = not in_quote
            elif char == "]" and not in_quote:
                break
            pos += 1
        pos += 1
    if pos == 0 or pos > len(text):
        raise ValueError("bad structured data")
    return text[:pos], text[pos:]


def parse(data: bytes | str, peer: str = "", received: float = 0.0) -> Message:
    """Parse one datagram. Never raises: what cannot be parsed ends up whole in `msg`."""
    raw = data.decode("utf-8", errors="replace") if isinstance(data, bytes) else data
    text = raw.rstrip("\r\n\x00")
    pri = _PRI.match(text)
    if pri is None or int(pri.group(1)) > 191:
        return Message(1, 5, 0, "", "", "", "", "", "", text, raw, peer, received)
    value = int(pri.group(1))
    facility, severity = divmod(value, 8)
    rest = text[pri.end():]
    if rest[:2] == "1 ":
        fields = rest[2:].split(" ", 5)
        if len(fields) == 6:
            stamp, host, app, procid, msgid, tail = fields
            try:
                sd, msg = _split_sd(tail)
                msg = msg[1:] if msg.startswith(" ") else msg
                msg = msg[1:] if msg.startswith("\ufeff") else msg
                return Message(facility, severity, 1, _nil(stamp), _nil(host), _nil(app), _nil(procid),
                               _nil(msgid), "" if sd == NIL else sd, msg, raw, peer, received)
            except ValueError:
                pass
    return _parse_3164(facility, severity, rest, raw, peer, received)


def _parse_3164(facility: int, severity: int, rest: str, raw: str, peer: str, received: float) -> Message:
    stamp = host = app = procid = ""
    match = _3164_TIME.match(rest)
    if match:
        stamp = match.group(1)
        rest = rest[match.end():]
        first, sep, after = rest.partition(" ")
        # HOSTNAME is optional in practice (busybox syslogd leaves it out): a first word that is
        # already a TAG ("app:" or "app[pid]:") means there is none.
        if sep and not re.match(r"^[^\s:\[]{1,48}(\[[^\]]*\])?:$", first):
            host, rest = first, after
    tag = _TAG.match(rest)
    if tag:
        app, procid = tag.group(1), tag.group(2) or ""
        rest = rest[tag.end():]
    return Message(facility, severity, 0, stamp, host, app, procid, "", "", rest, raw, peer, received)


class Receiver:
    """`with Receiver() as rx:` listens on rx.port (UDP) until the block ends."""

    def __init__(self, bind: str = "0.0.0.0", port: int = 0) -> None:
        self.bind = bind
        self.port = port
        self.messages: list[Message] = []
        self._cond = threading.Condition()
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def start(self) -> Receiver:
        family = socket.AF_INET6 if ":" in self.bind else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        if family == socket.AF_INET6:  # IPv6 only: an IPv4 receiver may hold the same port
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((self.bind, self.port))
        sock.settimeout(0.2)
        self.port = int(sock.getsockname()[1])
        self._sock = sock
        self._thread = threading.Thread(target=self._loop, name="syslogd", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        assert self._sock is not None
        while not self._stop.is_set():
            try:
                data, addr = self._sock.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            host = f"[{addr[0]}]" if ":" in addr[0] else addr[0]
            message = parse(data, peer=f"{host}:{addr[1]}", received=time.time())
            with self._cond:
                self.messages.append(message)
                self._cond.notify_all()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def snapshot(self) -> list[Message]:
        with self._cond:
            return list(self.messages)

    def wait_for(self, predicate: Callable[[Message], bool], timeout: float) -> Message | None:
        """The first message (already received or arriving within timeout) matching predicate."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for message in self.messages:
                    if predicate(message):
                        return message
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(timeout=min(left, 1.0))

    def __enter__(self) -> Receiver:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def read_lines(path: Path, offset: int = 0) -> list[Message]:
    """The messages a receiver process wrote to path after byte offset."""
    if not path.is_file():
        return []
    with path.open("rb") as f:
        f.seek(offset)
        return [Message(**json.loads(line)) for line in f.read().decode(errors="replace").splitlines() if line]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="a syslog receiver writing JSON lines")
    parser.add_argument("--bind", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    rx = Receiver(bind=args.bind, port=args.port).start()
    print(f"listening on {args.bind} port {rx.port}", flush=True)
    seen = 0
    with args.out.open("a") as out:
        try:
            while True:
                rx.wait_for(lambda m: False, 0.5)
                messages = rx.snapshot()
                for message in messages[seen:]:
                    out.write(json.dumps(message.to_json()) + "\n")
                out.flush()
                seen = len(messages)
        except KeyboardInterrupt:
            return 0


if __name__ == "__main__":
    sys.exit(main())
