"""Free ports for servers started by this project: chosen outside the kernel's ephemeral range."""

from __future__ import annotations

import contextlib
import random
import socket
from pathlib import Path


def ephemeral_ports() -> range:
    """The ports the kernel gives outgoing connections (Linux's `ip_local_port_range`; its default elsewhere)."""
    with contextlib.suppress(OSError, ValueError):
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return range(low, high + 1)
    return range(32768, 61000)


def free_ports(host: str, count: int) -> list[int]:
    """`count` distinct ports free on `host` now, outside the ephemeral range: a port the kernel hands out could be
    taken by any outgoing connection between this check and the server's bind."""
    ephemeral = ephemeral_ports()
    candidates = [port for port in range(10000, 65536) if port not in ephemeral]
    found: list[int] = []
    for port in random.SystemRandom().sample(candidates, len(candidates)):
        with socket.socket() as probe:
            try:
                probe.bind((host, port))
            except OSError:
                continue
        found.append(port)
        if len(found) == count:
            return found
    raise OSError(f"fewer than {count} free ports on {host} outside the ephemeral range {ephemeral}")
