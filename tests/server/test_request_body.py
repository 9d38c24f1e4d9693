"""fl_server/rest/request_body.py: the body of known length read in one call, with werkzeug's checks intact.

A real Flask app on werkzeug's WSGI environ; the input stream hands out at most a few bytes per read (as a
socket may), so the loop that gathers a short-reading body is what is checked, not a single lucky read."""

from __future__ import annotations

import json

import pytest
from flask import Flask
from werkzeug.exceptions import ClientDisconnected, RequestEntityTooLarge
from werkzeug.test import EnvironBuilder

from fl_server.rest.request_body import WholeBodyRequest


class Trickle:
    """A wsgi.input that returns at most ``step`` bytes per read and counts the reads (read only, as gunicorn's
    request body is)."""

    def __init__(self, data: bytes, step: int) -> None:
        self._data, self._at, self.step, self.reads = data, 0, step, 0

    def read(self, size: int = -1) -> bytes:
        self.reads += 1
        n = self.step if size is None or size < 0 else min(size, self.step)
        out = self._data[self._at:self._at + n]
        self._at += len(out)
        return out


def _request(app: Flask, body: bytes, step: int, content_length: int | None = None) -> tuple[WholeBodyRequest, Trickle]:
    env = EnvironBuilder(method="POST", path="/x", data=body, content_type="application/json").get_environ()
    stream = Trickle(body, step)
    env["wsgi.input"] = stream
    env["CONTENT_LENGTH"] = str(len(body) if content_length is None else content_length)
    return WholeBodyRequest(env), stream


@pytest.fixture
def app() -> Flask:
    app = Flask("t")
    app.request_class = WholeBodyRequest
    app.config["MAX_CONTENT_LENGTH"] = 1 << 20
    return app


def test_a_body_of_known_length_is_read_whole_once_and_cached(app: Flask) -> None:
    body = bytes(range(256)) * 2000  # 512 KB
    req, stream = _request(app, body, step=1 << 30)
    with app.app_context():
        assert req.get_data() == body
        assert stream.reads == 1  # one call, not werkzeug's 64 KiB steps
        assert req.get_data(cache=True) is req.get_data()  # later reads come from the cache


def test_short_reads_are_gathered_and_json_still_parses(app: Flask) -> None:
    doc = {"metrics": list(range(5000))}
    body = json.dumps(doc).encode()
    req, stream = _request(app, body, step=777)
    with app.test_request_context():
        assert req.get_data() == body and stream.reads > 1
        assert req.get_json() == doc


def test_a_body_above_the_limit_is_refused_before_it_is_read(app: Flask) -> None:
    body = b"x" * ((1 << 20) + 1)
    req, stream = _request(app, body, step=1 << 30)
    with app.app_context(), pytest.raises(RequestEntityTooLarge):
        req.get_data()
    assert stream.reads == 0


def test_werkzeug_still_stops_at_the_declared_length(app: Flask) -> None:
    req, _ = _request(app, b"abcdefgh" + b"TRAILING", step=3, content_length=8)
    with app.app_context():
        assert req.get_data() == b"abcdefgh"


def test_a_client_that_sends_less_than_it_declared_is_refused(app: Flask) -> None:
    req, _ = _request(app, b"abc", step=2, content_length=8)
    with app.app_context(), pytest.raises(ClientDisconnected):
        req.get_data()


def test_a_chunked_body_takes_werkzeugs_path(app: Flask) -> None:
    req, stream = _request(app, b"abcdefgh", step=3)
    req.environ["HTTP_TRANSFER_ENCODING"] = "chunked"
    req.environ["wsgi.input_terminated"] = True
    with app.app_context():
        assert req.get_data() == b"abcdefgh" and stream.reads > 1
