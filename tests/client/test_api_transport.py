"""The client's transport on a real loopback socket: a server that dies in the middle of an answer.

A server killed with ``kill -9`` while it writes a response leaves the client with the headers and part of
the body: requests raises ``ChunkedEncodingError`` from reading the body, not ``ConnectionError``. The daemon
must treat it as the server being unreachable (retry, back off), not crash on it.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Callable, Iterator

import pytest
from cryptography.fernet import Fernet

from fl_client.api import Credentials, ServerApi, ServerUnreachable
from fl_common.crypto.keys import SessionKeys
from fl_common.protocol.rest import PATH_MODEL


@contextlib.contextmanager
def _accepting(handle: Callable[[socket.socket, threading.Event], None]) -> Iterator[str]:
    """A loopback listener whose accepted connections go to ``handle(conn, stop)`` on the accepting thread; yields
    its URL, and stops (``stop`` set, listener closed) when the block ends."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            handle(conn, stop)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(timeout=5)
        listener.close()


@pytest.fixture
def half_answering_server() -> Iterator[tuple[str, list[int]]]:
    """Answers every request with headers promising 478 bytes, sends 10, and closes the connection."""
    served: list[int] = []

    def answer(conn: socket.socket, _stop: threading.Event) -> None:
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 478\r\n\r\n{\"state\":")
            served.append(1)

    with _accepting(answer) as url:
        yield url, served


@pytest.fixture(scope="module")
def model_server() -> Iterator[tuple[str, bytes, list[bytes], list[int]]]:
    """Serves ``GET /api/v1/model`` on keep-alive connections (each accepted one noted in ``accepted``): the whole
    body, or, while ``cut`` holds a marker, 10 of the promised bytes and a closed connection."""
    body = os.urandom(3 << 20)
    cut: list[bytes] = []
    accepted: list[int] = []

    def one(conn: socket.socket, stop: threading.Event) -> None:
        with conn:
            while not stop.is_set():
                request = b""
                while b"\r\n\r\n" not in request:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    request += chunk
                assert request.startswith(f"GET {PATH_MODEL} ".encode())
                head = f"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nETag: \"v1\"\r\nContent-Length: {len(body)}\r\n\r\n"
                if cut:
                    conn.sendall(head.encode() + body[:10])
                    return
                conn.sendall(head.encode() + body)

    def accept(conn: socket.socket, stop: threading.Event) -> None:
        accepted.append(1)
        threading.Thread(target=one, args=(conn, stop), daemon=True).start()

    with _accepting(accept) as url:
        yield url, body, cut, accepted


def _signed_api(url: str, sleep: list[float]) -> ServerApi:
    api = ServerApi(url, timeout=5, max_retries=2, sleep=sleep.append)
    api.creds = Credentials("c-1", "token", 0.0, SessionKeys(fernet_key=Fernet.generate_key(), hmac_key=os.urandom(32)))
    return api


def test_a_model_download_is_read_whole_on_a_kept_alive_connection(
        model_server: tuple[str, bytes, list[bytes], list[int]]) -> None:
    url, body, cut, accepted = model_server
    assert not cut
    api = _signed_api(url, [])
    before = len(accepted)
    for _ in range(3):
        assert api.download_model(None, encrypted=False) == (body, '"v1"')
    assert len(accepted) == before + 1  # one connection: a body read whole leaves it to the next request


def test_a_model_body_cut_short_is_asked_for_again_then_the_server_is_unreachable(
        model_server: tuple[str, bytes, list[bytes], list[int]]) -> None:
    url, _, cut, _ = model_server
    waits: list[float] = []
    api = _signed_api(url, waits)
    cut.append(b"cut")
    try:
        with pytest.raises(ServerUnreachable, match=r"GET /api/v1/model failed after 3 attempt\(s\): .* while reading the body"):
            api.download_model(None, encrypted=False)
    finally:
        cut.clear()
    assert len(waits) == 2  # backed off before each of the two retries


def test_an_answer_cut_short_is_an_unreachable_server_and_is_retried(half_answering_server: tuple[str, list[int]]) -> None:
    url, served = half_answering_server
    waits: list[float] = []
    api = ServerApi(url, timeout=5, max_retries=2, sleep=waits.append)
    with pytest.raises(ServerUnreachable, match=r"POST /api/v1/register failed after 3 attempt\(s\): ChunkedEncodingError"):
        api.register("token", client_name="c", partition=None, num_samples=None, capability={})
    assert len(served) == 3 and len(waits) == 2  # the first try and both retries reached the server, backing off between
    assert api.creds is None
