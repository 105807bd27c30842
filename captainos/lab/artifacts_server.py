"""The lab's artifact server (Smee's OSIE URL and ISO upstream): a directory over HTTP that
logs each request as one JSON line with the exact time and the client's address.

    python3 -m captainos.lab.artifacts_server --bind 10.77.0.1 --port 8080 --directory out/
"""

from __future__ import annotations

import argparse
import functools
import http.server
import json
import sys
import time


class Handler(http.server.SimpleHTTPRequestHandler):
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
    args = parser.parse_args(argv)
    handler = functools.partial(Handler, directory=args.directory)
    with http.server.ThreadingHTTPServer((args.bind, args.port), handler) as server:
        server.serve_forever()


if __name__ == "__main__":
    main()
