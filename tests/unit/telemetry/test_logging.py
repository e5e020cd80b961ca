from __future__ import annotations

import io
import json
import logging

from meshward.telemetry import TEXT_FORMAT, JsonFormatter, lean_records, setup_json_logging


def test_json_lines_carry_extra_fields() -> None:
    stream = io.StringIO()
    logger = setup_json_logging(stream=stream, logger="meshward.test-json")
    logger.info("denied", extra={"policy": "shop/deny-admin", "rule": 0, "trace_id": "ab" * 16})
    logger.warning("second")
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert lines[0]["msg"] == "denied"
    assert lines[0]["policy"] == "shop/deny-admin" and lines[0]["rule"] == 0
    assert lines[0]["level"] == "info" and lines[0]["ts"].endswith("Z")
    assert lines[1]["level"] == "warning"


def test_setup_is_idempotent() -> None:
    stream = io.StringIO()
    setup_json_logging(stream=stream, logger="meshward.test-idem")
    logger = setup_json_logging(stream=stream, logger="meshward.test-idem")
    logger.error("once")
    assert len(stream.getvalue().splitlines()) == 1
    assert logging.getLogger("meshward.test-idem").propagate is False


def _lines() -> tuple[str, dict[str, object]]:
    """One connection line as `xds serve` writes it, in both formats, timestamps cut off."""
    text, js = io.StringIO(), io.StringIO()
    plain = logging.StreamHandler(text)
    plain.setFormatter(logging.Formatter(TEXT_FORMAT))
    structured = logging.StreamHandler(js)
    structured.setFormatter(JsonFormatter())
    logger = logging.getLogger("meshward.test-lean")
    logger.handlers[:] = [plain, structured]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.info(
        "node %s connected (%s, stream %d, %s)", "ns/a/r0", "delta", 7, "spiffe://td/ns/a/sa/a",
        extra={"node": "ns/a/r0", "mode": "delta", "peer": "ipv4:127.0.0.1:1"},
    )  # fmt: skip
    entry = json.loads(js.getvalue())
    del entry["ts"]
    return text.getvalue().split(" ", 2)[2], entry


def test_lean_records_print_the_same_lines() -> None:
    before = _lines()
    saved = (logging._srcfile, logging.logThreads, logging.logProcesses, logging.logMultiprocessing)
    try:
        lean_records()
        assert logging._srcfile is None and not logging.logThreads
        after = _lines()
    finally:
        (
            logging._srcfile,
            logging.logThreads,
            logging.logProcesses,
            logging.logMultiprocessing,
        ) = saved
    assert after == before
    assert after[0] == (
        "INFO meshward.test-lean: node ns/a/r0 connected (delta, stream 7, spiffe://td/ns/a/sa/a)\n"
    )
    assert after[1]["node"] == "ns/a/r0" and after[1]["peer"] == "ipv4:127.0.0.1:1"
