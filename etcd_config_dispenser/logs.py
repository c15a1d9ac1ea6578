"""Log lines: text for people, or one JSON object a line with fields for log collectors.

Every line that reports an event passes its facts as ``extra=fields(...)``: the
text format shows only the message, the JSON format adds them as fields, so a
collector can select ``event == "published"`` or a revision without parsing
messages. Key names may appear, values and passwords never.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

# The fields a line may carry, besides time, level, logger and message.
LIST_MAX = 100  # paths shown in a field; the rest counted (a 16 KiB line splits in Docker)
FIELDS = ("event", "revision", "files", "written", "removed", "signal", "pid", "exit_code", "error")


def fields(event: str, **facts: Any) -> dict[str, Any]:
    """``extra=`` for a log call: the event's name and its facts (see FIELDS)."""
    unknown = set(facts) - set(FIELDS)
    if unknown:
        raise ValueError(f"not a log field: {sorted(unknown)}")
    return {"event": event, **facts}


def printable(line: str) -> str:
    """A line of a command's output for the log: control characters escaped, so that
    output cannot forge log lines."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in line)


def output_tail(output: str, lines: int = 5) -> str:
    """The last lines of a command's output, printable, on one log line."""
    return " | ".join(printable(line) for line in output.strip().splitlines()[-lines:])


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message, then the event's fields."""

    def __init__(self) -> None:
        super().__init__()
        self.converter = time.gmtime  # the "Z" in the time says UTC

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in FIELDS:
            value = record.__dict__.get(name)
            if isinstance(value, list) and len(value) > LIST_MAX:  # one line stays readable
                value = [*value[:LIST_MAX], f"(+{len(value) - LIST_MAX} more)"]
            if value is not None:
                entry[name] = value if isinstance(value, (int, str, list)) else str(value)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging(level: str, form: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if form == "json":
        formatter: logging.Formatter = JsonFormatter()
    else:
        formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    handler.setFormatter(formatter)
    logging.basicConfig(level=level, handlers=[handler])
