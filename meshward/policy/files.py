"""Which files a set of paths stands for, and reading them within the size limit; the loader and
the policy watcher share it, so both always agree on what is read."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from meshward.policy.errors import Problem
from meshward.policy.yamlsafe import MAX_FILE_BYTES, too_large

POLICY_SUFFIXES = (".yaml", ".yml")


def is_policy_file(path: Path) -> bool:
    """YAML files that are not hidden, editor backups (``x.yaml~``) or swap/lock files."""
    return path.suffix in POLICY_SUFFIXES and not path.name.startswith((".", "#", "~"))


def policy_files(paths: Sequence[str | Path]) -> list[Path]:
    """The files a set of paths stands for: directories recursively and sorted (hidden entries
    and editor temp files skipped), files named explicitly as given whatever their suffix.
    The loader and the policy watcher share it, so both always agree on what is read."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found.extend(
                sorted(
                    p
                    for p in path.rglob("*")
                    if p.is_file()
                    and is_policy_file(p)
                    and not any(part.startswith(".") for part in p.relative_to(path).parts)
                )
            )
        else:
            found.append(path)
    return found


def read_file(path: Path, texts: dict[str, str], problems: list[Problem]) -> None:
    try:
        with path.open("rb") as file:
            data = file.read(MAX_FILE_BYTES + 1)  # never more: the file may be huge or endless
    except OSError as exc:
        problems.append(Problem(str(path), 0, "", f"cannot read: {exc}"))
        return
    if len(data) > MAX_FILE_BYTES:
        problems.append(Problem(str(path), 0, "", too_large()))
        return
    try:
        texts[str(path)] = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        problems.append(Problem(str(path), 0, "", f"cannot read: {exc}"))
