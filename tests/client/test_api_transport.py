"""The client's transport on a real loopback socket: a server that dies in the middle of an answer.

A server killed with ``kill -9`` while it writes a response leaves the client with the headers and part of
the body: requests raises ``ChunkedEncodingError`` from reading the body, not ``ConnectionError``. The daemon
must treat it as the server being unreachable (retry, back off), not crash on it.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

from fl_client.api import ServerApi, ServerUnreachable


@pytest.fixture
def half_answering_server() -> Iterator[tuple[str, list[int]]]:
    """Answers every request with headers promising 478 bytes, sends 10, and closes the connection."""
    listener = socket.create_server(("127.0.0.1", 0))
    served: list[int] = []
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.recv(65536)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 478\r\n\r\n{\"state\":")
                served.append(1)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}", served
    finally:
        stop.set()
        thread.join(timeout=5)
        listener.close()


def test_an_answer_cut_short_is_an_unreachable_server_and_is_retried(half_answering_server: tuple[str, list[int]]) -> None:
    url, served = half_answering_server
    waits: list[float] = []
    api = ServerApi(url, timeout=5, max_retries=2, sleep=waits.append)
    with pytest.raises(ServerUnreachable, match=r"POST /api/v1/register failed after 3 attempt\(s\): ChunkedEncodingError"):
        api.register("token", client_name="c", partition=None, num_samples=None, capability={})
    assert len(served) == 3 and len(waits) == 2  # the first try and both retries reached the server, backing off between
    assert api.creds is None
