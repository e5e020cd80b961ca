"""Running the "least privilege from observed traffic" chapter against a live demo mesh, and
`meshward demo --chapter ...`.

The chapter starts its own mesh (the shop with no AuthorizationPolicy: see
:func:`meshward.demo.tour_leastpriv.baseline_documents`), then walks
:data:`meshward.demo.tour_leastpriv.STEPS`. Calls go through the main tour's runner (same
evidence, same judging); `policy suggest` and `report` run as the commands an operator types
(``python -m meshward ...``): the chapter depends on their documented contracts only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from meshward.errors import UserError

CHAPTERS = ("main", "least-privilege", "all")
COMMAND_TIMEOUT = 120.0  # one `meshward policy suggest` / `report` run


@dataclass
class Entry:
    kind: str  # "traffic", "suggest", "apply", "report"
    title: str
    ok: bool
    text: str  # what a person reads
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class ChapterResult:
    entries: list[Entry] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return bool(self.entries) and all(e.ok for e in self.entries)

    def to_json(self) -> dict[str, Any]:
        return {
            "chapter": "least-privilege",
            "ok": self.ok,
            "seconds": round(self.seconds, 3),
            "steps": [
                {"kind": e.kind, "title": e.title, "ok": e.ok, **e.data} for e in self.entries
            ],
        }

    def render(self) -> str:
        from meshward.demo.tour_leastpriv import TITLE

        out = [f"==== chapter: {TITLE}"]
        for e in self.entries:
            out.extend(["", f"-- {e.title}" if e.kind != "traffic" else "", e.text])
        held = sum(1 for e in self.entries if e.ok)
        verdict = "every expectation held" if self.ok else f"{len(self.entries) - held} FAILED"
        out.extend(["", f"{held}/{len(self.entries)} steps as expected in {self.seconds:.1f}s: "
                        f"{verdict}"])  # fmt: skip
        return "\n".join(line for line in out if line is not None)


def meshward_json(argv: Sequence[str], timeout: float = COMMAND_TIMEOUT) -> tuple[int, Any, str]:
    """Run ``meshward ARGV --json`` as an operator would; (exit code, parsed stdout, stderr)."""
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "meshward", *argv, "--json"],
            capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return 1, None, f"`meshward {' '.join(argv)}` did not finish in {timeout:.0f}s"
    try:
        data = json.loads(proc.stdout) if proc.stdout.strip() else None
    except ValueError:
        data = None
    return proc.returncode, data, proc.stderr


class ChapterRunner:
    """Walks the chapter's steps against ``state`` (a running mesh with no authorization)."""

    def __init__(
        self,
        state: Any,
        work: Path,
        *,
        progress: Callable[[str], None] | None = None,
        check_alive: Callable[[], None] | None = None,
        converge_timeout: float = 30.0,
    ) -> None:
        from meshward.demo.tour import Runner

        self.state = state
        self.work = work
        self.say = progress or (lambda _line: None)
        self.check_alive = check_alive or (lambda: None)
        self.converge_timeout = converge_timeout
        self.tour = Runner(state, progress=self.say, check_alive=self.check_alive)
        self.admin = str(state.xds_admin).removeprefix("http://")
        self.radius: dict[str, dict[str, Any]] = {}

    def run(self, steps: Sequence[Any] | None = None) -> ChapterResult:
        from meshward.demo import tour_leastpriv as lp

        started = time.monotonic()
        result = ChapterResult()
        for step in lp.STEPS if steps is None else steps:
            self.check_alive()
            if isinstance(step, lp.Traffic):
                entry = self._traffic(step)
            elif isinstance(step, lp.Suggest):
                entry = self._suggest(step)
            elif isinstance(step, lp.Apply):
                entry = self._apply(step)
            else:
                entry = self._report(step)
            result.entries.append(entry)
            if not entry.ok:
                self.say(f"[least] FAILED: {entry.title}")
                if entry.kind in ("suggest", "apply"):
                    break  # the rest would judge a policy that is not there
        result.seconds = time.monotonic() - started
        return result

    # -- phases ----------------------------------------------------------------------------------
    def _traffic(self, step: Any) -> Entry:
        from meshward.demo import tour_leastpriv as lp
        from meshward.demo.report import render
        from meshward.demo.tour import TourResult

        last = TourResult()
        problems: list[str] = []
        for _ in range(step.rounds):
            last = self.tour.run(step.calls)
            problems += [p for r in last.failed for p in r.problems]
        if step.title == lp.S_OPEN and not problems:
            problems += self._wait_flows(step.calls)
        text = render(last) + "".join(f"\nEXPECTATION FAILED: {p}" for p in problems[:5])
        return Entry("traffic", step.title, not problems, text, {"result": last.to_json()})

    def _wait_flows(self, calls: Sequence[Any]) -> list[str]:
        from meshward.demo.tour_leastpriv import flows_missing
        from meshward.flows.cli import fetch

        deadline = time.monotonic() + 15
        missing = ["not asked yet"]
        while time.monotonic() < deadline:
            try:
                rows = fetch(self.admin, "/flows", {"decision": "allow", "limit": "1000"}, 5.0)
                missing = flows_missing(rows, calls)
            except UserError as exc:
                missing = [str(exc)]
            if not missing:
                return []
            time.sleep(0.3)
        return [f"the flow store never showed: {', '.join(missing[:4])}"]

    def _suggest(self, step: Any) -> Entry:
        from meshward.demo.tour_leastpriv import judge_suggest, render_suggest

        out = self.work / step.out
        shutil.rmtree(out, ignore_errors=True)
        argv = ["policy", "suggest", "--xds", self.admin, "--since", "1h", "--namespace", "shop",
                "--out", str(out), "--mode", step.mode]  # fmt: skip
        self.say(f"[least] meshward {' '.join(argv)}")
        code, report, err = meshward_json(argv)
        verdict = judge_suggest(step.mode, code, report if isinstance(report, dict) else None, err)
        data = {"command": "meshward " + " ".join(argv), "out": step.out, **verdict.to_json()}
        return Entry("suggest", step.title, verdict.ok, render_suggest(verdict), data)

    def _apply(self, step: Any) -> Entry:
        from meshward.policy import PolicyError, load

        started = time.monotonic()
        policy_dir = Path(self.state.policy_dir)
        files = sorted((self.work / step.source).glob("*.yaml"))
        if not files:
            return Entry("apply", step.title, False, f"no files in {self.work / step.source}")
        for source in files:  # hidden temp file, then rename: the watcher never sees half a file
            tmp = policy_dir / f".{source.name}.tmp"
            shutil.copyfile(source, tmp)
            os.replace(tmp, policy_dir / source.name)
        try:
            version = load([policy_dir]).version
        except PolicyError as exc:
            return Entry("apply", step.title, False, f"the policy set does not load: {exc}")
        self.say(
            f"[least] applied {len(files)} file(s): policy {version[:12]}, waiting for sidecars"
        )
        problems = self.tour._wait_converged(version)  # the tour's own wait, same package
        seconds = time.monotonic() - started
        text = (
            f"~ {len(files)} file(s) into the policy directory: policy {version[:12]}, every "
            f"sidecar ACKed in {seconds:.1f}s"
            if not problems
            else "FAILED: " + "; ".join(problems)
        )
        data = {"files": [f.name for f in files], "policy_version": version}
        return Entry("apply", step.title, not problems, text, data)

    def _report(self, step: Any) -> Entry:
        from meshward.demo.tour_leastpriv import judge_radius, render_radius

        code, report, err = meshward_json(["report", "--xds", self.admin])
        blast = report.get("blast_radius") if isinstance(report, dict) else None
        if code != 0 or not isinstance(blast, dict):
            why = (err.strip().splitlines() or [f"exit {code}, no blast_radius"])[-1]
            return Entry("report", f"blast radius {step.label}", False, f"FAILED: {why}")
        self.radius[step.label] = blast
        if step.label != "after" or "before" not in self.radius:
            total = sum(len(v.get("transitive") or ()) for v in blast.values())
            text = f"{len(blast)} workloads, {total} reachable (workload, target) pairs in all"
            return Entry(
                "report", f"blast radius {step.label}", True, text, {"blast_radius": blast}
            )
        verdict = judge_radius(self.radius["before"], blast)
        title = "blast radius before -> after (what an attacker holding each workload reaches)"
        return Entry("report", title, verdict.ok, render_radius(verdict), verdict.to_json())


# -- `meshward demo --chapter` -------------------------------------------------------------------
def add_chapter_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--chapter", choices=CHAPTERS, default="main",
                        help="main: the tour (default); least-privilege: only the chapter "
                             "'least privilege from observed traffic' (its own mesh, started with "
                             "no authorization policy); all: the tour, then the chapter")  # fmt: skip


def dispatch(args: argparse.Namespace) -> int:
    """`meshward demo`: the main tour, the chapter, or both (each on its own mesh)."""
    from meshward.demo.cli import run as main_tour

    chapter = getattr(args, "chapter", "main")
    if chapter == "main" or args.attach:
        return main_tour(args)
    if chapter == "all" and args.json:
        raise UserError(
            "--json prints one chapter's results: pass --chapter main or least-privilege"
        )
    code = main_tour(args) if chapter == "all" else 0
    return max(code, run_chapter(args))


def run_chapter(args: argparse.Namespace) -> int:
    from meshward.demo.topology import DemoMesh, MeshOptions, find_examples
    from meshward.demo.tour_leastpriv import baseline_documents
    from meshward.policy import load

    out: TextIO = sys.stderr if args.json else sys.stdout

    def say(line: str) -> None:
        print(line, file=out, flush=True)

    temporary = args.state is None
    root = (  # short: each sidecar's admin socket lives under it (a Unix socket path limit)
        Path(tempfile.mkdtemp(prefix="meshward-lp-"))
        if temporary
        else Path(args.state).resolve() / "lp"
    )
    baseline = root / "baseline"  # the shop's workloads and mTLS, no authorization policy
    options = MeshOptions(state_dir=root, examples=baseline, timeout=args.timeout)
    mesh = DemoMesh(options, out=out)  # claims root (a demo state dir) before we write in it
    baseline.mkdir(parents=True, exist_ok=True)
    (baseline / "workloads.yaml").write_text(
        baseline_documents(load([find_examples(args.examples)]))
    )
    say(f"meshward demo: chapter least-privilege, state in {root}")
    failed = True
    try:
        with mesh:
            assert mesh.state is not None
            runner = ChapterRunner(
                mesh.state, root, progress=say, check_alive=mesh.supervisor.check_alive
            )
            result = runner.run()
            failed = not result.ok
    finally:
        if temporary and not failed:
            shutil.rmtree(root, ignore_errors=True)
        elif temporary:
            say(f"meshward demo: kept {root} for its logs (remove it when done)")
    if args.json:
        json.dump(result.to_json(), sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
    else:
        say("")
        say(result.render())
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    return 0 if result.ok else 1
