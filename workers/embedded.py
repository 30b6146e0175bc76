"""An embedded Redis-compatible server for ``deltaflush demo``: fakeredis over TCP, in a thread.

fakeredis's TCP handler closes a connection when a command returns an error (for example
``NOSCRIPT``, which every first ``EVALSHA`` of a script gets); real Redis keeps it open and
clients rely on that. Our handler sends the error and keeps the connection.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import redis
from fakeredis import TcpFakeServer
from fakeredis._clients._tcp_server import TCPFakeRequestHandler


class _Handler(TCPFakeRequestHandler):
    def setup(self) -> None:
        super().setup()
        read = self.current_client.read_response

        def read_response(*args: Any, **kwargs: Any) -> Any:
            try:
                return read(*args, **kwargs)
            except redis.ResponseError as exc:
                return exc  # encoded as an error reply; the connection stays open

        self.current_client.read_response = read_response  # type: ignore[method-assign]


@contextlib.contextmanager
def embedded_redis() -> Iterator[str]:
    """Run the server on a free loopback port; yield its URL."""
    server = TcpFakeServer(("127.0.0.1", 0), server_type="redis")
    server.RequestHandlerClass = _Handler
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="embedded-redis", daemon=True)
    thread.start()
    try:
        yield f"redis://127.0.0.1:{server.server_address[1]}/0"
    finally:
        server.shutdown()
        server.server_close()
