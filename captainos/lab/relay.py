"""A TCP relay from the lab's IPv6 addresses to an IPv4 service of the lab (run in the lab's
namespace): Tinkerbell v0.25 listens on one address for all its services, and `::` there would
also move Smee's syslog receiver, which only opens IPv4 (udp4), so its gRPC server stays on the
IPv4 address and this relay carries what VMs send to [<lab IPv6>]:<port>. It logs each
connection's peer, so a test can tell which VM came over IPv6.

    python3 -m captainos.lab.relay --port 42113 --to 10.77.0.1:42113
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import sys


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(OSError, RuntimeError):
            writer.close()


async def serve(port: int, host: str, target_port: int) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        print(f"connection from {peer[0]} to port {port}", flush=True)
        try:
            up_reader, up_writer = await asyncio.open_connection(host, target_port)
        except OSError as exc:
            print(f"upstream {host}:{target_port} refused {peer[0]}: {exc}", flush=True)
            writer.close()
            return
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))

    # An IPv6 socket only (asyncio sets IPV6_V6ONLY): the IPv4 address stays the service's own.
    server = await asyncio.start_server(handle, host="::", port=port, family=socket.AF_INET6)
    print(f"relaying [::]:{port} to {host}:{target_port}", flush=True)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--to", required=True, help="IPv4 host:port")
    args = parser.parse_args(argv)
    host, _, port = args.to.rpartition(":")
    try:
        asyncio.run(serve(args.port, host, int(port)))
    except KeyboardInterrupt:
        return 0
    return 1


if __name__ == "__main__":
    sys.exit(main())
