"""`meshward policy history` and `meshward policy rollback`: the applied policy sets the control
plane keeps (``GET /history``) and putting one of them back into the policy directory.

Rollback goes through the policy source, not around it: the stored set (checked against its
version: the SHA-256 of its canonical form) is written into --policy-dir and the control plane's
watcher applies it like any edit, so what runs is always what the directory says. The files it
replaces are moved, not deleted, to ``.meshward-rollback/<time>/`` inside the directory (hidden:
the watcher never reads it). The swap is a few renames done within milliseconds; the watcher
applies a change only once the directory has held still for a whole poll interval, so it never
applies a half-swapped directory.
Exit status: 0 done (rollback: applied and, with --wait, every connected node ACKed it); 1 the
version is unknown, the control plane is unreachable, the write failed, or the wait ran out.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from meshward.certs.files import write_atomic
from meshward.cliutil import (
    add_json_flag,
    admin_get,
    non_negative_float,
    print_json,
)
from meshward.errors import UserError
from meshward.xds.status_cli import add_admin_flags, default_admin

BACKUP_DIR = ".meshward-rollback"
DIFF_STATES = {
    "pending": "still being worked out (give --wait more seconds)",
    "skipped": "not worked out (too many changes at once; the set is kept)",
    "interrupted": "not worked out (the control plane stopped first)",
    "failed": "not worked out (an error; see the control plane's log)",
}

HISTORY_EPILOG = """\
examples:
  meshward policy history --xds 127.0.0.1:15011
  meshward policy history --xds 127.0.0.1:15011 --json | jq '.entries[0].closed'

Each entry is one applied policy set: its version (SHA-256 of the canonical set), when it was
applied, what kind of change it was (start, apply, rollback), the workloads whose policy it
changed, and the flows it opened and closed (probed as `meshward policy diff` does, on those
workloads only). The control plane keeps the last N sets (`meshward xds serve --history N`) and
an audit log of every change, rejected ones included (audit.log in its --history-dir).
The entry of a change is listed as soon as it is applied; what it changed is worked out once the
rollout's pushes are out: --wait (default 10s) gives the control plane that long to finish it
(an entry still without it says so: "diff": "pending" in --json).
exit status: 0 listed; 1 unreachable, or that control plane keeps no history.
"""

ROLLBACK_EPILOG = """\
examples:
  meshward policy history --xds 127.0.0.1:15011            # find the version
  meshward policy rollback 3f2a9c1e7b44 --xds 127.0.0.1:15011 --policy-dir policy/

VERSION: a version from `meshward policy history` (at least 8 leading hex digits). The stored
set is checked against its version, the policy files in --policy-dir (the directory the control
plane was started with, `xds serve --policy`) are moved to .meshward-rollback/<time>/ inside
it, and the set is written as one file, policy-<version>.yaml. The control plane applies it
like any edit and records it as a rollback. --wait (default 30s) waits until the control plane
serves the version and every connected sidecar has ACKed it; --wait 0 returns at once.
exit status: 0 rolled back (and converged); 1 unknown version, unreachable, write failed, or not
converged within --wait.
"""


def _get(address: str, path: str, params: dict[str, str], timeout: float) -> bytes:
    return admin_get(
        address, path, params, timeout,
        missing="that control plane keeps no history (started with --history-dir off?)"
        if path == "/history" else "",
    )  # fmt: skip


def fetch_history(address: str, timeout: float, wait: float = 0.0) -> dict[str, Any]:
    """``wait``: seconds the control plane may take to finish working out what the newest
    change did (entries whose ``diff`` is still ``pending``) before it answers."""
    wait = min(wait, 30.0)  # the most the control plane waits (history_service.MAX_READ_WAIT)
    params = {"wait": f"{wait:g}"} if wait > 0 else {}
    try:
        data: dict[str, Any] = json.loads(_get(address, "/history", params, timeout + wait))
        if not isinstance(data["entries"], list):
            raise TypeError("entries is not a list")
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{address}/history: unreadable answer ({exc})") from None
    return data


def in_force_index(entries: list[dict[str, Any]], current: str) -> int | None:
    """The entry to mark as in force: the newest one (``entries`` are newest first) carrying the
    current version. A rollback puts an older version back, so that version appears twice: the
    rollback entry is what is in force, the older entry is only where it came from."""
    return next((i for i, e in enumerate(entries) if e.get("version") == current), None)


def run_history(args: argparse.Namespace) -> int:

    address = args.xds or default_admin()
    data = fetch_history(address, args.timeout, args.wait)
    if args.json:
        print_json({"xds": address, **data})
        return 0
    entries = data["entries"]
    print(f"{len(entries)} applied policy set(s), newest first (keeping {data['keep']}; "
          f"in force: {data['current'][:12]})")  # fmt: skip
    in_force = in_force_index(entries, data["current"])
    for i, e in enumerate(entries):
        mark = "*" if i == in_force else " "
        action = e["action"] + (f" (restores {e['restores']})" if e.get("restores") else "")
        print(f"{mark} {e['version'][:12]}  {e['applied_at']}  {action}")
        if e["action"] == "start":
            continue
        if e.get("diff", "done") != "done":
            print(f"    what it changed: {DIFF_STATES.get(e['diff'], e['diff'])}")
            continue
        workloads = e["workloads"]
        more = e["workloads_total"] - len(workloads)
        listed = ", ".join(workloads[:8]) + (f" +{more + max(0, len(workloads) - 8)}"
                                             if more or len(workloads) > 8 else "")  # fmt: skip
        print(f"    workloads: {listed or '(none)'}")
        cut = " (probing stopped early: more may have changed)" if e["flows_truncated"] else ""
        print(f"    flows opened: {len(e['opened'])}, closed: {len(e['closed'])}{cut}")
        for key, sign in (("opened", "+"), ("closed", "-")):
            for f in e[key][:10]:
                print(f"      {sign} {f['source']} -> {f['destination']}:{f['port']} "
                      f"{f['method']} {f['path']}")  # fmt: skip
    return 0


def _atomic_write(path: Path, text: str) -> None:
    write_atomic(path, text.encode(), mode=0o644, overwrite=True)


def restore(policy_dir: Path, version: str, text: str, now: datetime) -> tuple[Path, list[Path]]:
    """Write ``text`` as the only policy file of ``policy_dir``; the others move to a backup
    directory inside it. Returns (the new file, the moved files' new places)."""
    from meshward.policy.files import policy_files

    if not policy_dir.is_dir():
        raise UserError(f"--policy-dir {policy_dir}: not a directory")
    target = policy_dir / f"policy-{version[:12]}.yaml"
    backup = policy_dir / BACKUP_DIR / now.strftime("%Y%m%dT%H%M%S.%fZ")
    old = [p for p in policy_files([policy_dir]) if p != target]
    fd, staged_name = tempfile.mkstemp(dir=policy_dir, prefix=".rollback-", suffix=".tmp")
    staged = Path(staged_name)
    try:
        with os.fdopen(fd, "w") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        moved: list[Path] = []
        for path in old:  # the swap: renames only, within one poll interval of the watcher
            dest = backup / path.relative_to(policy_dir)
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, dest)
            moved.append(dest)
        os.replace(staged, target)
    except OSError as exc:
        staged.unlink(missing_ok=True)
        raise UserError(f"rollback into {policy_dir} failed: {exc}") from None
    return target, moved


def _wait(address: str, version: str, seconds: float, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + seconds
    while True:
        status = json.loads(_get(address, "/status", {}, timeout))
        policy = status.get("policy", {})
        fleet = status.get("fleet", {})
        converged = policy.get("version") == version and fleet.get("in_sync", 0) == fleet.get(
            "connected", 0
        )
        if converged or time.monotonic() >= deadline:
            return {
                "converged": converged,
                "version": policy.get("version"),
                "error": policy.get("error"),
                "connected": fleet.get("connected", 0),
                "in_sync": fleet.get("in_sync", 0),
            }
        time.sleep(0.2)


def run_rollback(args: argparse.Namespace) -> int:
    from meshward.policy import PolicyError, parse

    address = args.xds or default_admin()
    try:
        text = _get(address, "/history/set", {"version": args.version}, args.timeout).decode()
    except UserError as exc:
        raise UserError(f"cannot roll back to {args.version}: {exc}") from None
    header, _, body = text.partition("\n")
    version = header.rsplit(" ", 1)[-1]
    try:
        loaded = parse({f"history/{version}.yaml": body})
    except PolicyError as exc:
        raise UserError(f"the stored set {version[:12]} does not load: {exc}") from None
    if loaded.version != version:
        raise UserError(f"the stored set does not match its version {version[:12]} "
                        f"(it hashes to {loaded.version[:12]}): not restoring it")  # fmt: skip
    target, moved = restore(Path(args.policy_dir), version, body, datetime.now(UTC))
    result: dict[str, Any] = {
        "xds": address,
        "version": version,
        "written": str(target),
        "moved": [str(p) for p in moved],
    }
    if args.wait > 0:
        result["status"] = _wait(address, version, args.wait, args.timeout)
    ok = args.wait == 0 or bool(result["status"]["converged"])
    if args.json:
        print_json(result)
        return 0 if ok else 1
    print(f"rolled back to {version[:12]}: wrote {target}")
    if moved:
        print(f"moved {len(moved)} earlier policy file(s) aside, e.g. to {moved[0]}")
    if args.wait > 0:
        s = result["status"]
        if ok:
            print(f"applied: the control plane serves {version[:12]}; "
                  f"{s['in_sync']}/{s['connected']} connected node(s) in sync")  # fmt: skip
        else:
            served = (s["version"] or "?")[:12]
            why = f"; last policy error: {s['error']}" if s["error"] else ""
            if served != version[:12] and not s["error"]:
                why = (f"; is {args.policy_dir} the directory `xds serve --policy` watches? "
                       "(moved files are in .meshward-rollback/ there)")  # fmt: skip
            print(f"NOT converged within {args.wait:g}s: serving {served}, "
                  f"{s['in_sync']}/{s['connected']} node(s) in sync{why}", flush=True)  # fmt: skip
    return 0 if ok else 1


def configure_history(sub: Any) -> None:
    p = sub.add_parser(
        "history",
        help="the applied policy sets the control plane keeps, and what each change did",
        description="List the last applied policy sets (newest first) with the workloads and "
        "flows each change touched.",
        epilog=HISTORY_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_admin_flags(p)
    p.add_argument("--wait", type=non_negative_float, default=10.0, metavar="SECONDS",
                   help="wait up to this long for what the newest change did to be worked out "
                        "(default: %(default)s; 0: answer at once)")  # fmt: skip
    add_json_flag(p)
    p.set_defaults(func=run_history)


def configure_rollback(sub: Any) -> None:
    p = sub.add_parser(
        "rollback",
        help="put an earlier applied policy set back into the policy directory",
        description="Restore a policy set from the control plane's history into the policy "
        "directory it watches; the control plane applies it and records a rollback.",
        epilog=ROLLBACK_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("version", metavar="VERSION", help="a version from `meshward policy history`")
    add_admin_flags(p)
    p.add_argument("--policy-dir", required=True, metavar="DIR",
                   help="the policy directory the control plane watches (`xds serve --policy`)")  # fmt: skip
    p.add_argument("--wait", type=non_negative_float, default=30.0, metavar="SECONDS",
                   help="wait until it is applied and ACKed (default: %(default)s; 0: no wait)")  # fmt: skip
    add_json_flag(p)
    p.set_defaults(func=run_rollback)
