"""sipcore.logfmt: one line per event that splits unambiguously."""
from __future__ import annotations

import json
import logging
import sys

from sipcore import logfmt
from sipcore.logfmt import EventFormatter, RateLimitedLog, event, logfmt_value, parse_logfmt, setup_logging


def record(fields, fmt="logfmt"):
    logger = logging.getLogger("t")
    rec = logger.makeRecord("t", logging.INFO, __file__, 1, "route", (), None,
                            extra={"event": "route", "fields": fields})
    return EventFormatter("proxy", fmt).format(rec)


def test_values_with_spaces_quotes_and_newlines_are_quoted_and_read_back():
    fields = {"call_id": 'a b"c', "reason": "line\nbreak", "ua": "x=y", "empty": "", "n": 3, "ok": True}
    line = record(fields)
    assert "\n" not in line
    back = parse_logfmt(line)
    assert back["call_id"] == 'a b"c' and back["reason"] == "line\nbreak" and back["ua"] == "x=y"
    assert back["empty"] == "" and back["n"] == "3" and back["ok"] == "true"
    assert back["event"] == "route" and back["proc"] == "proxy" and back["level"] == "info"


def test_fields_without_a_value_are_left_out():
    line = record({"node": None, "partner": "node2"})
    assert "node=" not in line.replace("partner=", "") and "partner=node2" in line


def test_plain_log_calls_and_worker_lines_split_the_same_way():
    rec = logging.getLogger("proxy.x").makeRecord("proxy.x", logging.WARNING, __file__, 1, "odd %s", ("a=b c",), None)
    line = EventFormatter("proxy", worker=1).format(rec)
    assert line.split(" ", 1)[1].startswith("level=warning proc=proxy worker=1 event=proxy.x ")
    back = parse_logfmt(line)
    assert back["msg"] == "odd a=b c" and back["worker"] == "1" and back["ts"].endswith("Z")
    obj = json.loads(EventFormatter("proxy", "json", worker=1).format(rec))
    assert obj["msg"] == "odd a=b c" and obj["worker"] == 1 and obj["event"] == "proxy.x"


def test_json_lines():
    obj = json.loads(record({"call_id": "c1", "node": None}, fmt="json"))
    assert obj["call_id"] == "c1" and "node" not in obj and obj["event"] == "route"


def test_control_characters_cannot_forge_a_second_line():
    assert logfmt_value("evil\r\nts=x level=error") == '"evil\\r\\nts=x level=error"'
    assert logfmt_value("\x1b[31m") == '"\\x1b[31m"'


def test_rate_limited_log_counts_what_it_suppressed():
    rl = RateLimitedLog(burst=3, per=60)
    results = [rl.allow() for _ in range(10)]
    assert [ok for ok, _ in results] == [True] * 3 + [False] * 7
    rl.window -= 61
    assert rl.allow() == (True, 7)


def test_disabled_level_formats_nothing():
    logger = logging.getLogger("quiet")
    logger.setLevel(logging.WARNING)

    class Boom:
        def __str__(self):
            raise AssertionError("formatted although DEBUG is off")
    event(logger, "route", logging.DEBUG, call_id=Boom())


def test_an_exception_logged_says_what_and_where_on_its_line():
    """log.exception (a node's unhandled error) and asyncio's handler wrote
    `msg="Unhandled exception in event loop"` and dropped the exception:
    an operator saw that something failed, never what or where."""
    def deepest():
        raise KeyError("peer")

    try:
        deepest()
    except KeyError:
        rec = logging.getLogger("asyncio").makeRecord("asyncio", logging.ERROR, __file__, 1,
                                                      "Unhandled exception in event loop", (),
                                                      sys.exc_info())
    line = EventFormatter("proxy").format(rec)
    assert "\n" not in line
    back = parse_logfmt(line)
    assert back["msg"] == "Unhandled exception in event loop" and back["error"] == "KeyError: 'peer'"
    assert back["trace"].endswith("test_logfmt.py:{} deepest".format(deepest.__code__.co_firstlineno + 1))
    obj = json.loads(EventFormatter("proxy", "json").format(rec))
    assert obj["error"] == "KeyError: 'peer'" and obj["trace"] == back["trace"]


def test_an_event_written_straight_to_the_file_reads_as_the_record_would(tmp_path):
    """event() writes its line straight to the handler setup_logging
    installed when nothing else would see it; with another handler (a
    filter, pytest's caplog) on the way, the record goes through logging
    as before. Both lines are the same, but for the time."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, logfmt._DIRECT[0])
    path = tmp_path / "x.log"
    fields = {"call_id": 'a b"c', "node": None, "n": 3}
    seen = []

    class Keep(logging.Handler):
        def emit(self, rec):
            seen.append(rec)
    try:
        setup_logging("proxy", level="info", path=str(path))
        log = logging.getLogger("proxy.t")
        event(log, "route", **fields)
        event(log, "quiet", logging.DEBUG, x=1)                       # below the level: nothing
        root.addHandler(Keep())
        event(log, "route", logging.WARNING, **fields)
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        logfmt._DIRECT[0] = saved[2]
    direct, through_logging = [parse_logfmt(line) for line in path.read_text().splitlines()]
    assert len(seen) == 1 and seen[0].fields == fields             # the other handler had the record
    expected = parse_logfmt(record(fields))
    for got, level in ((direct, "info"), (through_logging, "warning")):
        assert {k: v for k, v in got.items() if k != "ts"} == {**{k: v for k, v in expected.items() if k != "ts"},
                                                                "level": level}
