"""Keeps a client under test on loopback: any other network use is refused and reported.

The client tests put this directory on PYTHONPATH, so Python imports this module
at start-up (``site`` imports ``sitecustomize``) in every client process,
including console scripts such as ``llm``. An audit hook (PEP 578) sees each
name lookup and each socket connect; one that would leave 127.0.0.1 / ::1 raises
OSError before any packet is sent, and a line starting with ``OFFLINE-GUARD``
goes to stderr. Libraries that swallow the error and fall back (a cost map or a
tokenizer fetched "if possible") still leave that line, and the tests fail on it.
"""

from __future__ import annotations

import socket
import sys
from typing import Any

_LOOPBACK = {"127.0.0.1", "::1", "localhost", "localhost.", "ip6-localhost"}


def _host_of(event: str, args: tuple[Any, ...]) -> str | None:
    """The remote host an audited event would reach, or None when it stays local."""
    if event == "socket.connect":
        sock, address = args
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            return None  # AF_UNIX and the like never leave the machine
        host = address[0]
    elif event in ("socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyname_ex"):
        host = args[0]
        if host is None or host == "":
            return None  # a wildcard lookup for a listening socket
    else:
        return None
    if isinstance(host, bytes):
        host = host.decode("ascii", "replace")
    return None if str(host).lower() in _LOOPBACK else str(host)


def _guard(event: str, args: tuple[Any, ...]) -> None:
    if not event.startswith("socket."):
        return
    host = _host_of(event, args)
    if host is not None:
        sys.stderr.write(f"OFFLINE-GUARD refused {event} to {host}\n")
        sys.stderr.flush()
        raise OSError(f"network access to {host} refused: the client tests run offline")


sys.addaudithook(_guard)
