"""Loopback ports chosen before the processes that bind them start (`tether up`, the
tests, the benchmarks)."""

from __future__ import annotations

import socket

_GIVEN: set[int] = set()


def free_port() -> int:
    """A port free now and not handed out before by this process: the kernel may offer
    a port again once the probing socket is closed, and two of the processes started
    from one list of ports must not be given the same one (two sidecars of `tether up`
    were once given the same admin port)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _GIVEN:
            _GIVEN.add(port)
            return port


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
