"""docs/runbooks.md, executed: every ``console`` block's commands run in order against a real
local mesh (the demo shop: control plane, ext_authz, five Envoy sidecars) so the runbooks cannot
rot.

The format the docs follow (README of the convention, also at the top of runbooks.md):

- ``## `` headings are runbooks; each test below runs "Before you start" and then one runbook,
  so a runbook whose commands are missing fails alone.
- In a ```` ```console ```` block, ``$ `` starts a command, ``> `` continues it (a heredoc body,
  a function, a backslash continuation); other lines are sample output, shown to readers and
  not compared.
- ``<!-- check: ... -->`` right before a block states what its LAST command must do:
  ``exit=N`` (default 0), ``output="text"`` (in stdout or stderr; repeatable), ``absent="text"``,
  ``retry=SECONDS`` (re-run a read-only command until the rest holds: flows reach the store
  once a second), ``id=NAME`` (for tests that stop or act part-way). Every other command must
  exit 0.
- ``$XDS``, ``$POLICY_DIR`` ... are the placeholders "Before you start" lists; the test fills
  them from the running mesh.

The commands run in one bash per test (variables and functions carry over between blocks),
with the checkout's ``meshward`` first on PATH.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from meshward.demo import status_poll
from meshward.demo.topology import DemoMesh
from meshward.policy import load
from meshward.testing.processes import Launcher

DOC = Path(__file__).resolve().parents[2] / "docs" / "runbooks.md"
PREAMBLE = "Before you start"
COMMAND_TIMEOUT = 90.0  # one command (the `converged` helper waits up to 60 s itself)


# -- the document -----------------------------------------------------------------------------
@dataclass
class Check:
    exit: int = 0
    output: list[str] = field(default_factory=list)
    absent: list[str] = field(default_factory=list)
    retry: float = 0.0
    id: str = ""


@dataclass
class Block:
    section: str
    line: int  # 1-based line of the ```console fence
    commands: list[str]
    check: Check


def parse_check(text: str, where: str) -> Check:
    check = Check()
    for token in shlex.split(text):
        key, sep, value = token.partition("=")
        if not sep:
            raise ValueError(f"{where}: check token {token!r} is not KEY=VALUE")
        if key == "exit":
            check.exit = int(value)
        elif key == "output":
            check.output.append(value)
        elif key == "absent":
            check.absent.append(value)
        elif key == "retry":
            check.retry = float(value)
        elif key == "id":
            check.id = value
        else:
            raise ValueError(f"{where}: unknown check key {key!r}")
    return check


def parse(text: str) -> dict[str, list[Block]]:
    """Runbook title -> its console blocks, in document order."""
    sections: dict[str, list[Block]] = {}
    section = ""
    pending: Check | None = None
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        where = f"{DOC.name}:{i + 1}"
        if line.startswith("## "):
            section = line[3:].strip()
            sections.setdefault(section, [])
            pending = None
        elif line.startswith("<!-- check:"):
            body = line.removeprefix("<!-- check:").removesuffix("-->").strip()
            pending = parse_check(body, where)
        elif line.strip() == "```console":
            start = i + 1
            commands: list[str] = []
            i += 1
            while i < len(lines) and lines[i].strip() != "```":
                row = lines[i]
                if row.startswith("$ "):
                    commands.append(row[2:])
                elif (row.startswith("> ") or row == ">") and commands:
                    commands[-1] += "\n" + row[2:]
                i += 1
            if not commands:
                raise ValueError(f"{where}: a console block without a `$ ` command")
            sections.setdefault(section, []).append(
                Block(section, start, commands, pending or Check())
            )
            pending = None
        elif line.strip() and pending is not None:
            raise ValueError(f"{where}: a check comment must come right before a console block")
        i += 1
    return sections


def runbook(title_start: str) -> list[Block]:
    sections = parse(DOC.read_text())
    found = [t for t in sections if t.startswith(title_start)]
    assert len(found) == 1, f"no single runbook titled {title_start!r} in {DOC}: {list(sections)}"
    return sections[found[0]]


# -- a shell that keeps its variables ------------------------------------------------------------
class Shell:
    """One bash, fed one command at a time on its stdin (a pipe the launcher keeps); each
    command's output goes to its own files, bash's own to ``bash.log``."""

    def __init__(self, env: Mapping[str, str], workdir: Path) -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.count = 0
        self.launcher = Launcher(self.dir, quiet=True, logs=self.dir)
        self.bash = self.launcher.launch(
            "bash", ["bash", "--noprofile", "--norc"], env=env, cwd=self.dir, pipe_stdin=True
        )

    def run(self, command: str, timeout: float = COMMAND_TIMEOUT) -> tuple[int, str, str]:
        self.count += 1
        out, err, rc = (self.dir / f"{self.count}.{ext}" for ext in ("out", "err", "rc"))
        self.bash.write(
            f"{{\n{command}\n}} </dev/null >{out} 2>{err}\necho $? >{rc}.tmp && mv {rc}.tmp {rc}\n"
        )
        deadline = time.monotonic() + timeout
        while not rc.exists():
            if not self.bash.alive() or time.monotonic() > deadline:
                own = self.bash.log()[-2000:]
                pytest.fail(
                    f"runbook command did not finish in {timeout:.0f}s (or bash exited):\n"
                    f"$ {command}\nbash: {own}\nout: {_tail(out)}\nerr: {_tail(err)}"
                )
            time.sleep(0.05)
        return int(rc.read_text()), out.read_text(errors="replace"), err.read_text(errors="replace")

    def close(self) -> None:
        """End bash's input: it exits after its last command (5 s, then it is stopped)."""
        self.bash.close_input(timeout=5)


def _tail(path: Path) -> str:
    try:
        return path.read_text(errors="replace")[-2000:]
    except OSError:
        return ""


def missing_command(command: str, code: int, err: str) -> str | None:
    """`meshward policy history` before that command exists: argparse's "invalid choice"."""
    if code == 2 and "invalid choice" in err:
        return f"command not found: {command.splitlines()[0]!r} ({err.strip().splitlines()[-1]})"
    if code == 127:
        return f"command not found: {command.splitlines()[0]!r}"
    return None


def execute(shell: Shell, blocks: list[Block], *, until: str | None = None) -> None:
    """Run ``blocks`` in order (up to and including the block with check id ``until``)."""
    for block in blocks:
        for index, command in enumerate(block.commands):
            last = index == len(block.commands) - 1
            check = block.check if last else Check()
            deadline = time.monotonic() + check.retry
            while True:
                code, out, err = shell.run(command)
                gone = missing_command(command, code, err)
                if gone:
                    pytest.fail(f"{DOC.name}:{block.line} ({block.section}): {gone}")
                problems = judge(check, code, out + err)
                if not problems or time.monotonic() >= deadline:
                    break
                time.sleep(0.5)
            assert not problems, (
                f"{DOC.name}:{block.line} ({block.section}):\n$ {command}\n"
                + "\n".join(problems)
                + f"\n--- stdout\n{out[-3000:]}\n--- stderr\n{err[-3000:]}"
            )
        if until is not None and block.check.id == until:
            return
    assert until is None, f"no block with check id {until!r}"


def judge(check: Check, code: int, text: str) -> list[str]:
    problems = []
    if code != check.exit:
        problems.append(f"exit {code}, the runbook says {check.exit}")
    problems += [f"output lacks {want!r}" for want in check.output if want not in text]
    problems += [f"output has {bad!r}" for bad in check.absent if bad in text]
    return problems


# -- the mesh -----------------------------------------------------------------------------------
@dataclass
class Mesh:
    demo: DemoMesh
    env: dict[str, str]
    policy_dir: Path
    pristine: Path  # the example policies as the mesh started with them
    tmp: Path

    @property
    def admin(self) -> str:
        assert self.demo.state is not None and self.demo.state.xds_admin
        return self.demo.state.xds_admin

    def wait_converged(self, timeout: float = 30.0) -> None:
        version = load([self.policy_dir]).version
        deadline = time.monotonic() + timeout
        lagging = ["not asked yet"]
        while time.monotonic() < deadline:
            try:
                lagging = status_poll.lagging(
                    status_poll.fetch_status(self.admin), self.demo.refs, version
                )
            except OSError as exc:
                lagging = [str(exc)]
            if not lagging:
                return
            time.sleep(0.1)
        raise AssertionError(f"mesh not converged on {version[:12]}: {lagging}")

    def write_policy(self, name: str, content: str) -> None:
        """The way the docs tell operators to: a hidden temp file, then rename."""
        tmp = self.policy_dir / f".{name}.tmp"
        tmp.write_text(content)
        os.replace(tmp, self.policy_dir / name)

    def reset(self) -> None:
        """Back to the example policies (a runbook that failed half-way leaves its edits)."""
        for path in self.policy_dir.iterdir():
            if path.is_file() and not (self.pristine / path.name).exists():
                path.unlink()
        for source in self.pristine.iterdir():
            target = self.policy_dir / source.name
            if not target.exists() or target.read_bytes() != source.read_bytes():
                self.write_policy(source.name, source.read_text())
        self.wait_converged()

    def shell(self, name: str, **extra: str) -> Shell:
        return Shell({**self.env, **extra}, self.tmp / f"shell-{name}")


@pytest.fixture(scope="module")
def mesh(demo_mesh: Any) -> Iterator[Mesh]:
    """The shared demo mesh (tests/integration/conftest.py: ``SharedDemo``), which other
    modules use too."""
    base = demo_mesh.base / "runbooks"
    base.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MESHWARD_DEMO_LAST", str(base / "last-demo"))
        state = demo_mesh.mesh.state
        assert state is not None and state.xds_admin and state.ads
        policy_dir = Path(state.policy_dir)
        frontend, orders = state.workload("shop/frontend"), state.workload("shop/orders")
        env = {
            **os.environ,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "XDS": state.xds_admin.removeprefix("http://"),
            "ADS": state.ads,
            "POLICY_DIR": str(policy_dir),
            "CA_DIR": str(demo_mesh.state_dir / "ca"),
            "AGENTS": str(demo_mesh.state_dir / "agents"),
            "ORDERS_ADMIN": str(orders.admin),
            "ORDERS_VIA_FRONTEND": f"http://{frontend.outbound['shop/orders:8080']}",
            "INVENTORY_VIA_ORDERS": f"http://{orders.outbound['shop/inventory:8080']}",
            # runbook 1 waits for the expiry; 10 s did not always outlast its commands from `date`
            # to the curl that checks the flow on a busy machine
            "TTL": "15 seconds",
        }
        yield Mesh(demo_mesh.mesh, env, policy_dir, demo_mesh.pristine, base)


PLACEHOLDERS = {
    "XDS",
    "ADS",
    "POLICY_DIR",
    "CA_DIR",
    "AGENTS",
    "ORDERS_ADMIN",
    "ORDERS_VIA_FRONTEND",
    "INVENTORY_VIA_ORDERS",
    "TTL",
}


def http_status(url: str, method: str = "GET") -> int:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(urllib.request.Request(url, method=method), timeout=5) as r:
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


# -- incidents (what the runbooks are for) ---------------------------------------------------------
BROKEN_INVENTORY = """\
# The change that broke the shop: inventory's new API paths, and orders still calls the old ones.
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: inventory-allow-orders-read
  namespace: shop
spec:
  selector:
    matchLabels:
      app: inventory
  action: ALLOW
  rules:
    - from:
        - source:
            principals: ["cluster.local/ns/shop/sa/orders"]
      to:
        - operation:
            methods: ["GET", "HEAD"]
            paths: ["/inventory/items/*"]
"""

REFUNDS_DENY = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: orders-deny-refunds
  namespace: shop
spec:
  selector:
    matchLabels:
      app: orders
  action: DENY
  rules:
    - to:
        - operation:
            paths: ["/orders/{*}/refunds"]
"""


def break_inventory(mesh: Mesh) -> None:
    """A new inventory policy drops the paths orders calls: orders -> inventory is denied."""
    mesh.write_policy("inventory.yaml", BROKEN_INVENTORY)
    mesh.wait_converged()
    assert http_status(f"{mesh.env['INVENTORY_VIA_ORDERS']}/inventory/sku-123") == 403


# -- the tests -----------------------------------------------------------------------------------
def test_the_document_uses_only_known_placeholders() -> None:
    """A runbook that names a variable nobody sets would fail only for the operator."""
    sections = parse(DOC.read_text())
    assert PREAMBLE in sections and len(sections) >= 6, list(sections)
    assigned = {
        m.group(1)
        for blocks in sections.values()
        for b in blocks
        for c in b.commands
        for m in re.finditer(r"(?:^|[\s;(])(?:local\s+)?([A-Za-z_]\w*)=", c)
    }
    for title, blocks in sections.items():
        if title != PREAMBLE and blocks:
            assert any(b.check.output or b.check.exit for b in blocks), f"{title}: no checks"
        for block in blocks:
            for command in block.commands:
                for name in re.findall(r"\$\{?([A-Z][A-Z0-9_]*)", command):
                    assert name in PLACEHOLDERS | assigned, f"{block.line}: ${name} is set nowhere"


def test_a_flow_broken_by_a_new_policy(mesh: Mesh) -> None:
    mesh.reset()
    shell = mesh.shell("broken-flow")
    try:
        execute(shell, runbook(PREAMBLE))
        break_inventory(mesh)
        execute(shell, runbook("1."))
    finally:
        shell.close()
    # the emergency rule is gone, and the regular (fixed) policy carries the flow
    assert not list(mesh.policy_dir.glob("emergency-*.yaml"))
    assert http_status(f"{mesh.env['INVENTORY_VIA_ORDERS']}/inventory/sku-123") == 200


def test_an_emergency_allow_ends_by_itself(mesh: Mesh) -> None:
    """Runbook 1 up to "the flow works again", with a short TTL and no fix: at the expiry the
    control plane re-pushes and the flow is denied again, with nobody touching anything."""
    mesh.reset()
    shell = mesh.shell("expiry", TTL="15 seconds")
    url = f"{mesh.env['INVENTORY_VIA_ORDERS']}/inventory/sku-123"
    try:
        execute(shell, runbook(PREAMBLE))
        break_inventory(mesh)
        execute(shell, runbook("1."), until="emergency-works")  # its curl saw 200
        deadline = time.monotonic() + 25
        while http_status(url) != 403 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert http_status(url) == 403, "still allowed after the emergency rule expired"
    finally:
        shell.close()


def test_rollback_to_the_last_good_policy(mesh: Mesh) -> None:
    mesh.reset()
    shell = mesh.shell("rollback")
    try:
        execute(shell, runbook(PREAMBLE))
        break_inventory(mesh)
        execute(shell, runbook("2."))
    finally:
        shell.close()
    assert http_status(f"{mesh.env['INVENTORY_VIA_ORDERS']}/inventory/sku-123") == 200


def test_drift_and_nack_triage(mesh: Mesh) -> None:
    """A sidecar whose runtime caps regex programs below what the control plane assumes NACKs
    the next route with a path template: a real NACK, from a real Envoy."""
    mesh.reset()
    shell = mesh.shell("nack")
    try:
        execute(shell, runbook(PREAMBLE))
        subprocess.run(
            ["curl", "-sf", "-X", "POST", "--unix-socket", mesh.env["ORDERS_ADMIN"],
             "http://envoy/runtime_modify?re2.max_program_size.error_level=5"],
            check=True, capture_output=True,
        )  # fmt: skip
        mesh.write_policy("orders-deny-refunds.yaml", REFUNDS_DENY)
        execute(shell, runbook("3."))
    finally:
        shell.close()
    assert http_status(f"{mesh.env['ORDERS_VIA_FRONTEND']}/orders/42/refunds") == 403


def test_ca_root_rotation(mesh: Mesh) -> None:
    mesh.reset()
    shell = mesh.shell("rotation")
    try:
        execute(shell, runbook(PREAMBLE))
        execute(shell, runbook("5."))
    finally:
        shell.close()


def test_identity_outage(mesh: Mesh) -> None:
    """The control plane (the CA's only front door) goes away: runbook 4 up to the restart,
    the restart (deployment-specific: here the same command line on the same ports), the rest."""
    mesh.reset()
    blocks = runbook("4.")
    shell = mesh.shell("outage")
    try:
        execute(shell, runbook(PREAMBLE))
        xds = mesh.demo.supervisor.components["xds"]
        assert xds.process is not None
        argv = Path(f"/proc/{xds.process.pid}/cmdline").read_bytes().decode().split("\0")[:-1]
        xds.stop()
        execute(shell, blocks, until="restart-control-plane")
        state = mesh.demo.state
        assert state is not None and state.ads
        argv = _replace(argv, "--listen", state.ads)
        argv = _replace(argv, "--admin", mesh.env["XDS"])
        ready = Path(argv[argv.index("--ready-file") + 1])
        ready.unlink(missing_ok=True)
        mesh.demo.supervisor.launch("xds", argv, ready=ready.exists, what="control plane again")
        mesh.demo.supervisor.wait_ready(["xds"])
        rest = blocks[[b.check.id for b in blocks].index("restart-control-plane") + 1 :]
        execute(shell, rest)
    finally:
        shell.close()


def _replace(argv: list[str], flag: str, value: str) -> list[str]:
    index = argv.index(flag)
    return [*argv[: index + 1], value, *argv[index + 2 :]]
