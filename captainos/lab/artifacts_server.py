"""The lab's artifact server (Smee's OSIE URL and ISO upstream): a directory over HTTP that
logs each request as one JSON line with the exact time and the client's address.

    python3 -m captainos.lab.artifacts_server --bind 10.77.0.1 --port 8080 --directory out/ [--extra hub=DIR]

`--extra NAME=DIR` serves DIR under /NAME/ as well (the hub template's disk image).
"""

from __future__ import annotations

import argparse
import functools
import http.server
import json
import os
import sys
import time
from typing import ClassVar


class Handler(http.server.SimpleHTTPRequestHandler):
    extra: ClassVar[dict[str, str]] = {}

    def translate_path(self, path: str) -> str:
        """/NAME/... from an --extra directory, everything else from --directory."""
        first, _, rest = path.lstrip("/").partition("/")
        if first in self.extra and rest:
            inside = super().translate_path("/" + rest)  # normalised, with no way out (no "..")
            return os.path.join(self.extra[first], os.path.relpath(inside, self.directory))
        return super().translate_path(path)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        line = {"time": time.time(), "client": self.client_address[0], "method": self.command,
                "path": self.path, "code": int(code) if str(code).isdigit() else code}
        sys.stdout.write(json.dumps(line) + "\n")
        sys.stdout.flush()

    def log_message(self, format: str, *args: object) -> None:  # errors: one line on stderr
        sys.stderr.write(f"{self.address_string()} {format % args}\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bind", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--directory", required=True)
    parser.add_argument("--extra", action="append", default=[], metavar="NAME=DIR")
    args = parser.parse_args(argv)
    Handler.extra = dict(item.split("=", 1) for item in args.extra)
    handler = functools.partial(Handler, directory=args.directory)
    with http.server.ThreadingHTTPServer((args.bind, args.port), handler) as server:
        server.serve_forever()


if __name__ == "__main__":
    main()
