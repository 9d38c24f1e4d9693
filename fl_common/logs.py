"""Log output for the server and client CLIs: readable text, or one JSON object per line.

Both ``python -m fl_server`` and ``python -m fl_client`` take ``--log-format text|json``. JSON
lines are for log shippers (Loki, Elasticsearch, ``jq``): each line is an object with ``ts``
(ISO 8601, UTC), ``level``, ``logger``, ``message``, ``process`` and, when a record carries
them, ``exc_info`` and the ``extra={...}`` fields a caller attached. Nothing is added that the
message did not say: secrets stay out of logs because no log call passes one, and this
formatter only reformats.

It lives in ``fl_common`` because both sides use it; it needs only the standard library.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
from typing import Any, TextIO

LOG_FORMATS = ("text", "json")

#: attributes every LogRecord has; anything else on a record came from ``extra=``
_STANDARD = set(vars(logging.LogRecord("x", logging.INFO, "x", 0, "x", None, None))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.datetime.fromtimestamp(record.created, tz=datetime.timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "process": record.process,
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value if isinstance(value, (str, int, float, bool, type(None))) else repr(value)
        if record.exc_info:
            out["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def configure_logging(level: str = "INFO", log_format: str = "text", *, text_format: str | None = None,
                      stream: TextIO | None = None) -> None:
    """Replace the root logger's handlers with one stream handler in the chosen format."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, not {log_format!r}")
    handler = logging.StreamHandler(stream or sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(text_format or "%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper()))


def gunicorn_json_logconfig(level: str = "INFO") -> dict[str, Any]:
    """A ``logconfig_dict`` for gunicorn that sends its own logs and the app's as JSON lines to stderr."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": "fl_common.logs.JsonFormatter"}},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}},
        "root": {"level": level.upper(), "handlers": ["stderr"]},
        "loggers": {
            "gunicorn.error": {"level": "INFO", "handlers": ["stderr"], "propagate": False},
            # any logconfig_dict turns gunicorn's access log on; the text mode has none (latency is in /metrics)
            "gunicorn.access": {"level": "WARNING", "handlers": [], "propagate": False},
        },
    }


__all__ = ["LOG_FORMATS", "JsonFormatter", "configure_logging", "gunicorn_json_logconfig"]
