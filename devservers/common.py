"""What both servers share: the host, the start timeout, free ports, log tails, and the
``atexit`` net that stops servers their owner forgot to close."""

from __future__ import annotations

import atexit
import socket
from pathlib import Path
from typing import Protocol

HOST = "127.0.0.1"
START_TIMEOUT_S = 60.0


class Closable(Protocol):
    def close(self) -> None: ...


# Servers started and not yet closed, for the atexit net.
_LIVE: list[Closable] = []


def track(server: Closable) -> None:
    """Stop ``server`` at interpreter exit unless :func:`untrack` is called first."""
    if server not in _LIVE:
        _LIVE.append(server)


def untrack(server: Closable) -> None:
    if server in _LIVE:
        _LIVE.remove(server)


@atexit.register
def _close_all() -> None:
    for server in list(_LIVE):
        server.close()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def tail(path: Path, lines: int = 20) -> str:
    """The last ``lines`` lines of a log file, for error messages."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
