"""Nothing Meshward writes grows without bound (issue 13): the decision log and the demo's span
file rotate by size with a cap on their total, long fields are clipped with a marker, and one
huge span does not make its export fail."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshward.demo.traces import SpanFile, read_spans
from meshward.extauthz import decisionlog
from meshward.extauthz.authorizer import CheckResult
from meshward.telemetry import setup_tracing
from meshward.telemetry.collector import OtlpReceiver
from meshward.telemetry.limits import MAX_FIELD_CHARS, clip, read_rotated, rotated_files
from meshward.telemetry.tracing import MAX_ATTRIBUTE_CHARS

BUDGET = 256 * 1024
LONG_PATH = "/" + "p" * 15_000  # what a hostile caller sends (Envoy allows up to 60 KiB)


def _total(path: Path) -> int:
    return sum(p.stat().st_size for p in rotated_files(path))


def test_clip_marks_what_it_cut() -> None:
    assert clip("short") == "short"
    cut = clip("x" * 5000)
    assert cut.startswith("x" * MAX_FIELD_CHARS) and cut.endswith("...[truncated 3976 chars]")


@pytest.fixture
def decision_log(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "decisions.jsonl"
    decisionlog.open_decision_log(path, max_bytes=BUDGET)
    yield path
    decisionlog.open_decision_log(None)
    logging.getLogger(decisionlog.LOGGER).propagate = True


def test_a_flood_of_denials_cannot_fill_the_disk(decision_log: Path) -> None:
    """5,000 denied 15 KB-path requests were ~160 MB of decision log; now the log and its
    backups stay under the budget, each line is short, and the newest lines are kept."""
    for i in range(5_000):
        result = CheckResult(
            response=None,
            allowed=False,
            http_status=403,
            reason=f"path rejected: {LONG_PATH}",
            workload="shop/payments",
            method="GET",
            path=LONG_PATH + str(i),
            code="request_rejected",
        )
        decisionlog.record(result, f"{i:032x}")
    assert _total(decision_log) <= BUDGET + 4096
    files = rotated_files(decision_log)
    assert len(files) == 4  # decisions.jsonl + .1 .. .3
    lines = read_rotated(decision_log).splitlines()
    assert all(len(line) < 4 * MAX_FIELD_CHARS for line in lines)
    last = json.loads(lines[-1])
    assert last["trace_id"] == f"{4999:032x}" and last["code"] == "request_rejected"
    assert last["path"].endswith(f"...[truncated {len(LONG_PATH) + 4 - MAX_FIELD_CHARS} chars]")
    assert "[truncated" in last["msg"] and "[truncated" in last["reason"]
    trace_ids = [json.loads(line)["trace_id"] for line in lines]
    assert trace_ids == sorted(trace_ids)  # oldest file first: `meshward denials` order


def test_the_span_file_rotates_and_clips(tmp_path: Path) -> None:
    path = tmp_path / "traces.jsonl"
    with SpanFile(path, max_bytes=64 * 1024) as sink:
        provider = setup_tracing("flood", sink.endpoint, schedule_delay_millis=50)
        tracer = provider.get_tracer("test")
        for i in range(400):
            with tracer.start_as_current_span("check") as span:
                span.set_attribute("meshward.reason", f"denied {i} " + LONG_PATH)
        provider.shutdown()  # type: ignore[attr-defined]
        assert sink.spans == 400
    assert _total(path) <= 64 * 1024 + 4096
    spans = read_spans(path)
    assert spans and len(spans[-1]["attributes"]["meshward.reason"]) <= 2 * MAX_FIELD_CHARS


def test_one_huge_span_is_exported_clipped() -> None:
    """A 17 MB attribute would make the export exceed any collector's message limit (4 MiB by
    default, 16 MiB ours): the span limits clip it, so the export succeeds."""
    with OtlpReceiver() as receiver:
        provider = setup_tracing("huge", receiver.endpoint, schedule_delay_millis=50)
        tracer = provider.get_tracer("test")
        with tracer.start_as_current_span("check") as span:
            for i in range(200):
                span.set_attribute(f"extra.{i}", "v" * 5000)
            span.set_attribute("url.path", "/" + "h" * 17_000_000)
        provider.shutdown()  # type: ignore[attr-defined]
        spans = receiver.wait_for(lambda s: any(x.name == "check" for x in s), timeout=15)
    (got,) = [s for s in spans if s.name == "check"]
    assert len(str(got.attributes["url.path"])) == MAX_ATTRIBUTE_CHARS
    assert len(got.attributes) <= 64


def test_reading_a_log_that_is_not_configured_or_not_readable_gives_nothing(
    tmp_path: Path,
) -> None:
    """The demo's tour and `meshward denials` read optional logs through this one function."""
    assert read_rotated(None) == "" and read_rotated("") == ""
    log = tmp_path / "access.log"
    assert read_rotated(str(log)) == ""  # configured, not written yet
    log.with_name("access.log.1").write_text("old")
    log.write_text("new\n")
    assert read_rotated(str(log)) == read_rotated(log) == "old\nnew\n"
    (tmp_path / "dir.log").mkdir()
    assert read_rotated(tmp_path / "dir.log") == ""  # unreadable: skipped, no OSError
