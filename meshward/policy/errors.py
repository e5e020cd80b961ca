"""Problems found in policy files, reported all at once so an operator fixes a file in one pass."""

from __future__ import annotations

from dataclasses import dataclass

from meshward.errors import UserError

# A reason quotes the offending value; a hostile or broken file can make that value megabytes
# long, and the reason ends up in logs, `meshward status` and the CLI. Keep its head.
MAX_REASON_CHARS = 500


@dataclass(frozen=True, order=True)
class Problem:
    """One thing wrong (or, for warnings, suspicious) in one document.

    ``index`` is the 1-based document position in ``file``; 0 means the file as a whole (for
    example a YAML syntax error, which stops the parser before documents can be counted).
    """

    file: str
    index: int
    field: str
    reason: str

    def __post_init__(self) -> None:
        if len(self.reason) > MAX_REASON_CHARS:
            cut = len(self.reason) - MAX_REASON_CHARS
            object.__setattr__(
                self, "reason", f"{self.reason[:MAX_REASON_CHARS]}... ({cut} more characters)"
            )

    def __str__(self) -> str:
        where = f"{self.file}#{self.index}" if self.index else self.file
        if self.field:
            return f"{where} {self.field}: {self.reason}"
        return f"{where}: {self.reason}"


class PolicyError(UserError):
    """The policy set is invalid. Carries every problem, not just the first."""

    def __init__(
        self, problems: tuple[Problem, ...] | list[Problem], *, where: str = "policy files"
    ) -> None:
        self.problems: tuple[Problem, ...] = tuple(problems)
        count = len(self.problems)
        head = f"{count} problem{'s' if count != 1 else ''} in {where}; fix them and re-run"
        super().__init__("\n".join([head, *(f"  {p}" for p in self.problems)]))
