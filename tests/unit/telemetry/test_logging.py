from __future__ import annotations

import io
import json
import logging

from meshward.telemetry import setup_json_logging


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
