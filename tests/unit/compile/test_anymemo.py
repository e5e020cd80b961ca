"""The per-Any walk memo: exact keys, and bounded by the bytes it holds."""

from __future__ import annotations

from meshward.compile.anymemo import AnyMemo


def test_found_by_exact_type_and_bytes() -> None:
    memo: AnyMemo[int] = AnyMemo()
    memo.put("t/a", b"xyz", 1)
    assert memo.get("t/a", b"xyz") == 1
    assert memo.get("t/a", b"xyy") is None
    assert memo.get("t/b", b"xyz") is None


def test_a_flood_stays_within_the_limit() -> None:
    memo: AnyMemo[int] = AnyMemo(limit=10_000)
    for i in range(5_000):
        memo.put("t", i.to_bytes(4, "big") * 25, i)  # 101 bytes a key
        assert memo.held <= 10_000
    assert len(memo) <= 10_000 // 101
    assert memo.resets >= 5_000 // (10_000 // 101) - 1
    assert memo.get("t", (4_999).to_bytes(4, "big") * 25) == 4_999  # the newest is kept


def test_a_value_larger_than_the_limit_is_never_held() -> None:
    memo: AnyMemo[int] = AnyMemo(limit=100)
    assert memo.put("t", b"x" * 200, 7) == 7
    assert len(memo) == 0 and memo.held == 0
