"""Structured logs: an event name plus key=value fields, so one chat's life can be followed
across replicas with grep (`chat_id=... `) whatever process wrote the line. With
`CHATD_LOG_FORMAT=json` each line is instead one JSON object (`time`, `level`, `logger`,
`event` and the fields), for log shippers (docs/operations.md, "Metrics and logs")."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any


class StructuredLogger:
    """A thin wrapper that turns `log.info("run.started", chat_id=x)` into one parseable line."""

    def __init__(self, name: str) -> None:
        self._logger = logging.getLogger(name)

    def _log(self, level: int, event: str, fields: dict[str, Any]) -> None:
        if not self._logger.isEnabledFor(level):
            return
        exc_info = fields.pop("exc_info", None)
        rendered = " ".join(f"{key}={_render(value)}" for key, value in fields.items())
        self._logger.log(
            level,
            "%s %s",
            event,
            rendered,
            exc_info=exc_info,
            extra={"chatd_event": event, "chatd_fields": fields},
        )

    def debug(self, event: str, **fields: Any) -> None:
        self._log(logging.DEBUG, event, fields)

    def info(self, event: str, **fields: Any) -> None:
        self._log(logging.INFO, event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._log(logging.WARNING, event, fields)

    def error(self, event: str, **fields: Any) -> None:
        self._log(logging.ERROR, event, fields)


def _render(value: Any) -> str:
    text = str(value)
    if text == "" or any(ch.isspace() or ch in '"=' for ch in text):
        return json.dumps(text)
    return text


def get_logger(name: str) -> StructuredLogger:
    return StructuredLogger(name)


class JsonFormatter(logging.Formatter):
    """One JSON object per line. chatd's events keep their fields as JSON members; other
    libraries' records carry their message."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
        }
        event = getattr(record, "chatd_event", None)
        if event is not None:
            line["event"] = event
            for key, value in getattr(record, "chatd_fields", {}).items():
                line.setdefault(key, value)
        else:
            line["message"] = record.getMessage()
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str, ensure_ascii=False)


# Libraries whose INFO lines are noise to an operator (pgserver prints every initdb and pg_ctl
# command it runs, with their whole output).
_QUIET_LIBRARIES = ("pgserver",)


def configure_logging(level: str = "INFO", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        formatter: logging.Formatter = JsonFormatter()
        formatter.converter = time.gmtime
    else:
        formatter = logging.Formatter(
            "%(asctime)s %(levelname)s %(name)s %(message)s", "%Y-%m-%dT%H:%M:%S"
        )
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in _QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
