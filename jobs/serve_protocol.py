"""uvicorn's HTTP/1.1 protocol with TCP_NODELAY on every connection (for ``finfeat serve``).

asyncio sets TCP_NODELAY only on sockets whose protocol number is TCP. The listening socket that
uvicorn binds itself for ``--workers`` > 1 has protocol 0, so its connections kept Nagle's
algorithm, and a response written in two parts waited for the client's delayed ACK: about 40 ms
per request. Module level, so that uvicorn's worker processes can unpickle it.
"""
from __future__ import annotations

import socket
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol


class NoDelayH11Protocol(H11Protocol):
    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        super().connection_made(transport)
