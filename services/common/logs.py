"""Logging set-up, done once at each entry point: plain text or one JSON object per line.

Records about a request carry its id (services.common.request_id): text lines show it in brackets
after the logger name, JSON lines as a "request_id" field.
"""

from __future__ import annotations

import json
import logging
import sys
import time

from services.common.request_id import RequestIdLogFilter

_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s%(request_tag)s: %(message)s"


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        request_id = getattr(record, "request_id", None)
        record.request_tag = f" [{request_id}]" if request_id else ""
        return super().format(record)


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        payload = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None)
        if request_id:
            payload["request_id"] = request_id
        if record.exc_info:
            payload["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(payload, ensure_ascii=False)


def configure_logging(level: str = "INFO", fmt: str = "text") -> None:
    """Configure the root logger for a chatfleet process (again in each child it spawns, from
    `logging_settings()`)."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(_TextFormatter(_TEXT_FORMAT))
    # On the handler, not a logger: handler filters see the records of every logger.
    handler.addFilter(RequestIdLogFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Access logs of every HTTP request are noise at INFO.
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)


def logging_settings() -> tuple[str, str]:
    """(level, format) of this process's logging, for a child process to log the same way."""
    root = logging.getLogger()
    fmt = "json" if any(isinstance(h.formatter, _JsonFormatter) for h in root.handlers) else "text"
    return logging.getLevelName(root.level), fmt
