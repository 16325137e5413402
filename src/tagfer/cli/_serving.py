"""Connection-limit options shared by ``tagfer serve`` and ``tagfer study serve`` (:mod:`tagfer.core.serving`)."""

from __future__ import annotations

import typer

from tagfer.core.serving import ServerLimits

_D = ServerLimits()

MAX_CONNECTIONS = typer.Option(_D.max_connections, "--max-connections", min=2, help="Open connections at once, idle ones "
                               "included; a request on one more gets 503 and its connection is closed.")
HEADER_TIMEOUT = typer.Option(_D.header_timeout_s, "--header-timeout", min=0.1, max=600.0, metavar="SECONDS",
                              help="Time a client has to send a request's line and headers (slowloris guard): slower "
                              "ones get 408, idle connections are closed.")
KEEP_ALIVE = typer.Option(_D.keep_alive_s, "--keep-alive", min=0.1, max=600.0, metavar="SECONDS",
                          help="An idle connection is closed this long after its last response.")
MAX_HEADER_KB = typer.Option(_D.max_header_bytes // 1024, "--max-header-kb", min=1, max=1024,
                             help="Largest request line + headers in KiB; larger get 431.")


def server_limits(max_connections: int, header_timeout: float, keep_alive: float, max_header_kb: int) -> ServerLimits:
    """The :class:`ServerLimits` of the options above."""
    return ServerLimits(max_connections=max_connections, header_timeout_s=header_timeout, keep_alive_s=keep_alive,
                        max_header_bytes=max_header_kb * 1024)
