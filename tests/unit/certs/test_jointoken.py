"""Join tokens: minted, verified once, refused with a clear reason otherwise (pure + files)."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from meshward.certs import jointoken
from meshward.certs.jointoken import JoinRefused, UsedTokens, mint, verify
from meshward.errors import UserError

NOW = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)
KEY = b"k" * 32


def test_genuine_token_verifies_and_names_its_workload() -> None:
    token = mint(KEY, "shop/orders", ttl=timedelta(minutes=10), now=NOW)
    claims = verify(KEY, token, workload="shop/orders", now=NOW + timedelta(minutes=9))
    assert claims.workload == "shop/orders"
    assert claims.expires_at == NOW + timedelta(minutes=10)


def test_expired_token_is_refused() -> None:
    token = mint(KEY, "shop/orders", ttl=timedelta(minutes=10), now=NOW)
    with pytest.raises(JoinRefused, match="expired at") as info:
        verify(KEY, token, workload="shop/orders", now=NOW + timedelta(minutes=10))
    assert info.value.reason == jointoken.EXPIRED


def test_token_for_another_workload_is_refused() -> None:
    token = mint(KEY, "shop/orders", ttl=timedelta(minutes=10), now=NOW)
    with pytest.raises(JoinRefused, match="for workload shop/orders, not shop/payments") as info:
        verify(KEY, token, workload="shop/payments", now=NOW)
    assert info.value.reason == jointoken.WRONG_WORKLOAD


@pytest.mark.parametrize("how", ["edited-payload", "other-key", "edited-mac"])
def test_forged_token_is_refused_as_bad_signature(how: str) -> None:
    token = mint(KEY, "shop/orders", ttl=timedelta(minutes=10), now=NOW)
    prefix, payload, mac = token.split(".")
    if how == "edited-payload":  # claim another workload with the original MAC
        other = mint(KEY, "shop/payments", ttl=timedelta(hours=1), now=NOW).split(".")[1]
        token = f"{prefix}.{other}.{mac}"
    elif how == "other-key":
        token = mint(b"x" * 32, "shop/orders", ttl=timedelta(minutes=10), now=NOW)
    else:
        token = f"{prefix}.{payload}.{mac[:-2]}AA"
    with pytest.raises(JoinRefused, match="signature does not verify") as info:
        verify(KEY, token, workload="shop/orders", now=NOW)
    assert info.value.reason == jointoken.BAD_SIGNATURE


@pytest.mark.parametrize("token", ["", "garbage", "a.b.c", "mwjoin1.x", "mwjoin1." + "A" * 5000])
def test_malformed_tokens_are_refused(token: str) -> None:
    with pytest.raises(JoinRefused) as info:
        verify(KEY, token, workload="shop/orders", now=NOW)
    assert info.value.reason in {jointoken.MALFORMED, jointoken.BAD_SIGNATURE}


def test_ttl_is_bounded() -> None:
    with pytest.raises(UserError, match="between 1s and 24h"):
        mint(KEY, "shop/orders", ttl=timedelta(days=2), now=NOW)
    with pytest.raises(UserError, match="between 1s and 24h"):
        mint(KEY, "shop/orders", ttl=timedelta(0), now=NOW)


def test_a_token_is_single_use_across_restarts(tmp_path: Path) -> None:
    token = mint(KEY, "shop/orders", ttl=timedelta(minutes=10), now=NOW)
    claims = verify(KEY, token, workload="shop/orders", now=NOW)
    UsedTokens(tmp_path).consume(claims, NOW)
    assert (tmp_path / jointoken.USED_FILE).stat().st_mode & 0o777 == 0o600
    restarted = UsedTokens(tmp_path)  # a new process reads the record
    with pytest.raises(JoinRefused, match="already used") as info:
        restarted.consume(claims, NOW)
    assert info.value.reason == jointoken.USED


def test_spent_ids_are_forgotten_once_their_token_expired(tmp_path: Path) -> None:
    used = UsedTokens(tmp_path)
    for _ in range(5):
        token = mint(KEY, "shop/orders", ttl=timedelta(minutes=1), now=NOW)
        used.consume(verify(KEY, token, workload="shop/orders", now=NOW), NOW)
    later = NOW + timedelta(minutes=2)
    token = mint(KEY, "shop/orders", ttl=timedelta(minutes=1), now=later)
    used.consume(verify(KEY, token, workload="shop/orders", now=later), later)
    used.prune(later)
    assert len(used) == 1
    assert len(UsedTokens(tmp_path)) == 1  # compacted on disk too


def test_flood_of_tokens_is_bounded(tmp_path: Path) -> None:
    used = UsedTokens(tmp_path, max_entries=10)
    for _ in range(10):
        token = mint(KEY, "shop/orders", ttl=timedelta(hours=1), now=NOW)
        used.consume(verify(KEY, token, workload="shop/orders", now=NOW), NOW)
    token = mint(KEY, "shop/orders", ttl=timedelta(hours=1), now=NOW)
    with pytest.raises(JoinRefused, match="too many"):
        used.consume(verify(KEY, token, workload="shop/orders", now=NOW), NOW)
    assert len(used) == 10


def test_corrupt_record_fails_closed(tmp_path: Path) -> None:
    path = tmp_path / jointoken.USED_FILE
    path.write_text("abc notanumber\n")
    path.chmod(0o600)
    with pytest.raises(UserError, match="corrupt"):
        UsedTokens(tmp_path)
    path.write_text("abc 123\n")
    path.chmod(0o644)  # someone else could have edited it
    with pytest.raises(UserError, match="corrupt"):
        UsedTokens(tmp_path)


def test_torn_last_append_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / jointoken.USED_FILE
    path.write_text("abc 9999999999\ndef 99")  # crash mid-append: that join was never answered
    path.chmod(0o600)
    used = UsedTokens(tmp_path)
    assert "abc" in used and "def" not in used


def test_log_is_compacted(tmp_path: Path) -> None:
    used = UsedTokens(tmp_path)
    for i in range(1100):  # each expires a minute later: all moot at the end
        at = NOW + timedelta(minutes=i)
        token = mint(KEY, "shop/orders", ttl=timedelta(minutes=1), now=at)
        used.consume(verify(KEY, token, workload="shop/orders", now=at), at)
    lines = (tmp_path / jointoken.USED_FILE).read_text().count("\n")
    assert lines < 1100 and len(UsedTokens(tmp_path)) <= lines


def test_key_is_created_private_and_reused(tmp_path: Path) -> None:
    key = jointoken.load_or_create_key(tmp_path)
    assert len(key) == 32
    assert (tmp_path / jointoken.KEY_FILE).stat().st_mode & 0o777 == 0o600
    assert jointoken.load_or_create_key(tmp_path) == key
    os.chmod(tmp_path / jointoken.KEY_FILE, 0o644)
    with pytest.raises(UserError, match="accessible by group/others"):
        jointoken.load_or_create_key(tmp_path)


def test_group_commit_batches_fsyncs_and_refuses_reuse_in_flight(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Joins in flight share one fsync (done off the event loop); a token is refused from the
    moment it is reserved, before its line is durable; every committed line survives a restart."""
    import asyncio

    fsyncs: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(jointoken.os, "fsync", lambda fd: (fsyncs.append(fd), real_fsync(fd)))
    used = UsedTokens(tmp_path)
    tokens = [mint(KEY, "shop/orders", ttl=timedelta(minutes=10), now=NOW) for _ in range(200)]
    claims = [verify(KEY, t, workload="shop/orders", now=NOW) for t in tokens]

    async def join(i: int) -> None:
        line = used.reserve(claims[i], NOW)
        await used.commit(line)

    async def scenario() -> None:
        pending = [asyncio.ensure_future(join(i)) for i in range(200)]
        await asyncio.sleep(0)
        with pytest.raises(JoinRefused, match="already used"):  # reserved, not yet durable
            used.reserve(claims[0], NOW)
        await asyncio.gather(*pending)

    asyncio.run(scenario())
    assert 1 <= len(fsyncs) < 20  # batched: far fewer fsyncs than joins
    restarted = UsedTokens(tmp_path)  # as after a crash: every committed token stays spent
    assert len(restarted) == 200
    for c in claims:
        with pytest.raises(JoinRefused):
            restarted.check(c)


def test_failed_commit_releases_the_token(tmp_path: Path) -> None:
    import asyncio

    used = UsedTokens(tmp_path / "missing" / "dir")
    (tmp_path / "missing").write_text("a file where the directory should be")
    token = mint(KEY, "shop/orders", ttl=timedelta(minutes=10), now=NOW)
    claims = verify(KEY, token, workload="shop/orders", now=NOW)

    async def join() -> None:
        line = used.reserve(claims, NOW)
        try:
            await used.commit(line)
        except UserError:
            used.release(claims)
            raise

    with pytest.raises(UserError, match="Not a directory"):
        asyncio.run(join())
    used.check(claims)  # nothing was issued: the token is not spent
