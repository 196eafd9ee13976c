"""Start `phoenix serve` with its OTLP gRPC receiver on the loopback only. Run by the Phoenix
venv's python (`make phoenix`), not ours.

Phoenix binds its gRPC port on every interface (`[::]:PORT`) with no setting to change it; the
project's servers bind 127.0.0.1, so this wraps grpc's `add_insecure_port` before Phoenix starts.
The HTTP side follows PHOENIX_HOST."""

from __future__ import annotations

import sys

import grpc.aio._server as grpc_server
from phoenix.server.main import main

_add = grpc_server.Server.add_insecure_port


def _loopback(self: grpc_server.Server, address: str) -> int:
    return _add(self, address.replace("[::]", "127.0.0.1", 1))


grpc_server.Server.add_insecure_port = _loopback  # type: ignore[method-assign]

if __name__ == "__main__":
    sys.argv = ["phoenix", "serve"]
    sys.exit(main())
