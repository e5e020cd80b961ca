"""The launcher's pipe-driven workers: real child processes talked to over stdin/stdout."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest

from meshward.testing.processes import Launcher

# Answers each line upper-cased on stdout, notes it on stderr (the log), exits 3 at EOF.
ECHO = """\
import os, sys
print("cwd", os.getcwd(), flush=True)
for line in sys.stdin:
    print("seen", line.strip(), file=sys.stderr, flush=True)
    print(line.strip().upper(), flush=True)
sys.exit(3)
"""
# Ignores the end of its input: only a signal ends it.
STUBBORN = "import sys, time\nsys.stdin.read()\ntime.sleep(600)\n"


def test_a_worker_is_driven_line_by_line_and_finishes_at_the_end_of_its_input(
    tmp_path: Path,
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    with Launcher(tmp_path, quiet=True) as launcher:
        worker = launcher.launch(
            "echo", [sys.executable, "-c", ECHO], cwd=work, pipe_stdin=True, pipe_stdout=True
        )
        assert worker.readline() == f"cwd {work}\n"
        worker.write("hello\n")
        assert worker.readline() == "HELLO\n"
        worker.write("again\n")
        assert worker.readline() == "AGAIN\n"
        assert worker.close_input(timeout=30) == 3  # it saw EOF and exited by itself
        assert not worker.alive()
        assert worker.readline() == ""  # closed with the process
        log = worker.log()
    # stderr went to the log, stdout only to the pipe
    assert "seen hello" in log and "seen again" in log
    assert "HELLO" not in log


def test_a_worker_that_ignores_the_end_of_its_input_is_stopped(tmp_path: Path) -> None:
    with Launcher(tmp_path, quiet=True) as launcher:
        worker = launcher.launch("stubborn", [sys.executable, "-c", STUBBORN], pipe_stdin=True)
        assert worker.close_input(timeout=0.5) == -signal.SIGTERM
        assert not worker.alive()


def test_a_restart_keeps_the_pipes_and_the_working_directory(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    with Launcher(tmp_path, quiet=True) as launcher:
        first = launcher.launch(
            "echo", [sys.executable, "-c", ECHO], cwd=work, pipe_stdin=True, pipe_stdout=True
        )
        assert first.readline() == f"cwd {work}\n"
        launcher.kill("echo")
        second = launcher.restart("echo")
        assert second is not first and second.alive()
        assert second.readline() == f"cwd {work}\n"
        second.write("back\n")
        assert second.readline() == "BACK\n"


def test_pipes_must_be_asked_for(tmp_path: Path) -> None:
    with Launcher(tmp_path, quiet=True) as launcher:
        plain = launcher.launch("plain", [sys.executable, "-c", ECHO])
        with pytest.raises(ValueError, match="without pipe_stdin"):
            plain.write("x\n")
        with pytest.raises(ValueError, match="without pipe_stdout"):
            plain.readline()
        # stdin is /dev/null: the worker reads EOF at once and exits by itself
        assert plain.process is not None and plain.process.wait(30) == 3
        assert f"cwd {Path.cwd()}" in plain.log()
