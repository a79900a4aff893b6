"""Network helpers shared by every process launcher (torchrun ports, gloo rendezvous)."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port that was free on this host a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))  # all interfaces: the port may be reached from other nodes
        return int(s.getsockname()[1])
