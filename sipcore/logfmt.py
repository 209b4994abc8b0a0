"""One line per event: logfmt (default) or JSON lines, on stderr or a file.

    ts=2026-11-25T09:00:00.123Z level=info proc=proxy event=route method=INVITE ...

Values containing spaces, quotes, '=' or control characters are quoted with
backslash escapes, so every line splits unambiguously (`grep event=failover`,
`cut`, Loki/Vector logfmt parsers). A log file is watched (once a second):
logrotate may move it and the lines from the next second on go to a new file.

Callers log with `event(logger, "name", key=value, ...)`; when the level is
off, the call returns before formatting anything. When it is on and the
handler setup_logging installed is the only one the line would reach,
the line is written straight to it, without a LogRecord and the logging
machinery's walk (8 us a line in a loop, where it was 14); anything else
(another handler, a filter: pytest's caplog) gets the record as before.
"""
from __future__ import annotations

import json
import logging
import logging.handlers
import os
import sys
import time
import traceback

_NEEDS_QUOTE = frozenset(' "=\\\t\r\n')


def logfmt_value(value) -> str:
    if value is None:
        return '""'
    if value is True or value is False:
        return "true" if value else "false"
    text = str(value)
    if not text:
        return '""'
    if _NEEDS_QUOTE.isdisjoint(text) and text.isprintable():
        return text
    escaped = (text.replace("\\", "\\\\").replace('"', '\\"')
               .replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t"))
    escaped = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in escaped)
    return f'"{escaped}"'


_second: list = [-1, ""]     # the last whole second formatted, and how


def _ts(created: float) -> str:
    whole = int(created)
    if whole != _second[0]:
        _second[:] = [whole, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))]
    return f"{_second[1]}.{int(created % 1 * 1000):03d}Z"


def utc_time(t: float) -> str:
    """A time as the log lines write it (ts=; a call record's started=)."""
    return _ts(t)


class _DirectWrite:
    """A handler event() may hand a finished line to (write_line)."""

    def write_line(self, line: str) -> None:
        self.acquire()
        try:
            self.before_write()
            self.stream.write(line + self.terminator)
            self.flush()
        except Exception:                     # as Handler.emit does: never raise from logging
            self.handleError(None)
        finally:
            self.release()

    def before_write(self) -> None:
        pass


class _StderrHandler(_DirectWrite, logging.StreamHandler):
    pass


class _RotatedFileHandler(_DirectWrite, logging.handlers.WatchedFileHandler):
    """A WatchedFileHandler that looks for a rotation (stat of the path)
    at most once a second, not before every line: lines written in the
    second after logrotate moved the file still land in the moved one."""

    def __init__(self, path: str):
        super().__init__(path)
        self.checked = 0.0

    def reopenIfNeeded(self) -> None:
        now = time.monotonic()
        if now - self.checked >= 1.0:
            self.checked = now
            super().reopenIfNeeded()

    def before_write(self) -> None:
        self.reopenIfNeeded()
        if self.stream is None:
            self.stream = self._open()


class EventFormatter(logging.Formatter):
    def __init__(self, proc: str, fmt: str = "logfmt", worker: int | None = None):
        super().__init__()
        self.proc = proc
        self.worker = worker   # which of the proxy's worker processes, when there are several
        self.json = fmt == "json"
        # what follows the level on every logfmt line, up to the event's name
        self._after_level = (f" proc={logfmt_value(proc)}"
                             + ("" if worker is None else f" worker={worker}") + " event=")

    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", None)
        if record.exc_info and record.exc_info[1] is not None:
            # a bug's exception, on the line that tells of it (log.exception,
            # asyncio's handler): what it was and where, innermost last
            fields = {**(fields if fields is not None else {"msg": record.getMessage()}),
                      **exception_fields(record.exc_info[1])}
        elif fields is None:
            fields = {"msg": record.getMessage()}
        return self.line(record.created, record.levelname.lower(), getattr(record, "event", record.name), fields)

    def line(self, created: float, level: str, event_name: str, fields: dict) -> str:
        """The line of an event; a field without a value is left out, not
        written as ""."""
        if not self.json:       # a line per routed request: built in one pass, no dicts
            parts = [f"ts={_ts(created)} level={level}{self._after_level}{logfmt_value(event_name)}"]
            parts.extend(f"{k}={logfmt_value(v)}" for k, v in fields.items() if v is not None)
            return " ".join(parts)
        head = {"ts": _ts(created), "level": level, "proc": self.proc}
        if self.worker is not None:
            head["worker"] = self.worker
        head["event"] = event_name
        return json.dumps({**head, **{k: v for k, v in fields.items() if v is not None}},
                          default=str, separators=(",", ":"))


def exception_fields(exc: BaseException, frames: int = 8) -> dict[str, str]:
    """error=Type: text, trace=file:line function > ... (the last `frames`
    frames, innermost last): a traceback on one greppable line."""
    tb = traceback.extract_tb(exc.__traceback__)[-frames:]
    return {"error": f"{type(exc).__name__}: {exc}"[:500],
            "trace": " > ".join(f"{os.path.basename(f.filename)}:{f.lineno} {f.name}" for f in tb)}


def setup_logging(proc: str, *, level: str = "info", fmt: str = "logfmt", path: str = "",
                  worker: int | None = None) -> None:
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler: logging.Handler
    # none of these is in a line, and each costs time on every record
    logging._srcfile = None         # the caller's file and line (the logging HOWTO's "Optimization")
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    if path:
        handler = _RotatedFileHandler(path)
    else:
        handler = _StderrHandler(sys.stderr)
    handler.setFormatter(EventFormatter(proc, fmt, worker))
    root.addHandler(handler)
    root.setLevel(level.upper())
    _DIRECT[0] = handler


_DIRECT: list = [None]       # the handler setup_logging installed
_LEVELS = {logging.DEBUG: "debug", logging.INFO: "info", logging.WARNING: "warning", logging.ERROR: "error",
           logging.CRITICAL: "critical"}


def _direct_to(logger: logging.Logger, level: int):
    """The handler setup_logging installed, when it is the only one this
    event would reach and nothing filters it; else None."""
    handler = _DIRECT[0]
    root = logging.root
    if handler is None or root.handlers != [handler] or handler.filters or level < handler.level \
            or level not in _LEVELS or not isinstance(handler.formatter, EventFormatter):
        return None
    c = logger
    while c is not root:
        if c.handlers or c.filters:
            return None
        if not c.propagate:
            return None
        c = c.parent
    return None if root.filters else handler


def event(logger: logging.Logger, name: str, level: int = logging.INFO, **fields) -> None:
    if logger.isEnabledFor(level):
        handler = _direct_to(logger, level)
        if handler is not None:
            handler.write_line(handler.formatter.line(time.time(), _LEVELS[level], name, fields))
        else:
            logger.log(level, name, extra={"event": name, "fields": fields})


def parse_logfmt(line: str) -> dict[str, str]:
    """Inverse of the formatter (used by `sipha logs` and the tests)."""
    out: dict[str, str] = {}
    i, n = 0, len(line)
    while i < n:
        while i < n and line[i] == " ":
            i += 1
        j = line.find("=", i)
        if j < 0:
            break
        key = line[i:j]
        j += 1
        if j < n and line[j] == '"':
            k = j + 1
            buf = []
            while k < n and line[k] != '"':
                if line[k] == "\\" and k + 1 < n:
                    k += 1
                    buf.append({"n": "\n", "r": "\r", "t": "\t"}.get(line[k], line[k]))
                else:
                    buf.append(line[k])
                k += 1
            out[key] = "".join(buf)
            i = k + 1
        else:
            k = line.find(" ", j)
            k = n if k < 0 else k
            out[key] = line[j:k]
            i = k
    return out


class RateLimitedLog:
    """At most `burst` lines per `per` seconds for one event; the rest are
    counted and the count is reported on the next line that gets through."""

    def __init__(self, burst: int = 10, per: float = 1.0):
        self.burst, self.per = burst, per
        self.window = 0.0
        self.count = 0
        self.suppressed = 0

    def allow(self) -> tuple[bool, int]:
        now = time.monotonic()
        if now - self.window >= self.per:
            self.window, self.count = now, 0
        self.count += 1
        if self.count > self.burst:
            self.suppressed += 1
            return False, 0
        s, self.suppressed = self.suppressed, 0
        return True, s
