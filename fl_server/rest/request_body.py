"""A request body of known length read in one piece (the upload routes' multi-megabyte bodies).

Why: werkzeug's ``Request.get_data()`` reads ``wsgi.input`` through ``LimitedStream``, 64 KiB per call, and
each call under gunicorn went through the connection's unreader, which receives up to 1 MiB ahead and copies
what it holds into a new buffer and back on every call; ``LimitedStream.read`` then copies what it got into a
fresh ``bytearray`` and that into fresh ``bytes``. On this kind of machine a fresh multi-megabyte buffer costs
more in page faults than in copying (the server hands its freed memory back after every round,
fl_server/rest/memory.py): in a py-spy profile of ten daemons' secure rounds (issue 12) reading the 5 MB masked
uploads was two thirds of the time the upload route held the GIL - the one process's GIL, while ten uploads
arrive together. Here a body of known length is one ``wsgi.input.read(length)``: gunicorn fills one buffer,
and nothing copies it again.

What werkzeug checks still holds: a Content-Length above ``MAX_CONTENT_LENGTH`` is refused (413) before
anything is read; no more than the declared length is read; a client that sends less gets werkzeug's
``ClientDisconnected`` (400). A chunked body (no Content-Length) and form parsing take werkzeug's own path.
The result is werkzeug's cache of the body, so ``get_json`` and every later ``get_data`` read it from memory.
"""

from __future__ import annotations

from typing import Any

from flask import Request
from werkzeug.exceptions import ClientDisconnected, RequestEntityTooLarge

__all__ = ["WholeBodyRequest"]


class WholeBodyRequest(Request):
    """Flask's request with :meth:`get_data` reading a body of known length in one call."""

    def get_data(self, cache: bool = True, as_text: bool = False, parse_form_data: bool = False) -> Any:
        length = self.content_length
        chunked = "chunked" in self.environ.get("HTTP_TRANSFER_ENCODING", "").lower()
        if cache and not parse_form_data and length and not chunked and getattr(self, "_cached_data", None) is None:
            limit = self.max_content_length
            if limit is not None and length > limit:
                raise RequestEntityTooLarge()
            source = self.environ["wsgi.input"]
            parts: list[bytes] = []
            left = length
            while left > 0:
                try:
                    piece = source.read(left)  # gunicorn: the whole body in one buffer; a short read loops
                except (OSError, ValueError):
                    piece = b""
                if not piece:
                    raise ClientDisconnected()
                parts.append(piece)
                left -= len(piece)
            self._cached_data = parts[0] if len(parts) == 1 else b"".join(parts)
        return super().get_data(cache=cache, as_text=as_text, parse_form_data=parse_form_data)  # type: ignore[call-overload]
