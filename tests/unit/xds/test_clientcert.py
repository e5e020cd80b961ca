"""ADS client certificates after a CA rotation: which sidecars `meshward status` flags."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from meshward.certs import CertificateAuthority, Svid
from meshward.xds.clientcert import OK, RETIRING, UNTRUSTED, ClientCertificate, credentials_status
from meshward.xds.status_cli import render, unhealthy

NOW = datetime.now(UTC)
FRONTEND = "spiffe://cluster.local/ns/shop/sa/frontend"


def test_credentials_state_follows_the_root_they_chain_to() -> None:
    ca = CertificateAuthority.ephemeral("cluster.local", now=NOW)
    before = ca.issue(FRONTEND, now=NOW)
    ca.rotate(grace=timedelta(hours=1), now=NOW)
    after = ca.issue(FRONTEND, now=NOW)

    def state(svid: Svid, at: datetime) -> dict[str, object]:
        generation = ca.issuing_generation(svid.certificate())
        cert = ClientCertificate(generation.number if generation else None, NOW)
        return credentials_status(cert, ca.generations, at)

    retiring = state(before, NOW)
    assert retiring["state"] == RETIRING and retiring["ca_generation"] == 1
    assert retiring["root_trusted_until"] == (NOW + timedelta(hours=1)).isoformat()
    assert "meshward bootstrap --renew" in str(retiring["warning"])
    fresh = state(after, NOW)
    assert fresh["state"] == OK and fresh["warning"] is None and fresh["ca_generation"] == 2
    dropped = state(before, NOW + timedelta(hours=1))
    assert dropped["state"] == UNTRUSTED and "cannot reconnect" in str(dropped["warning"])
    assert state(after, NOW + timedelta(hours=1))["state"] == OK
    unknown = credentials_status(ClientCertificate(None, NOW), ca.generations, NOW)
    assert unknown["state"] == UNTRUSTED


def test_status_lists_the_sidecars_to_re_bootstrap() -> None:
    stream = {"mode": "sotw", "types": [], "ads_credentials": {"state": RETIRING}}
    status = {
        "ads": {"address": "127.0.0.1:1", "server_identity": "spiffe://x"},
        "policy": {"version": "ab" * 32, "applied_at": NOW.isoformat()},
        "nodes": [
            {
                "node": "shop/a",
                "connected": True,
                "connected_since": NOW.isoformat(),
                "drift": False,
                "streams": [stream],
                "ads_credentials_warning": "ADS credentials chain to CA generation 1 ...",
            },
            {
                "node": "shop/b",
                "connected": True,
                "connected_since": NOW.isoformat(),
                "drift": False,
                "streams": [{**stream, "ads_credentials": {"state": OK}}],
                "ads_credentials_warning": None,
            },
        ],
    }
    lines = render(status, NOW).splitlines()
    assert "ADS CREDS" in lines[2]
    row_a = next(line for line in lines if line.startswith("shop/a"))
    row_b = next(line for line in lines if line.startswith("shop/b"))
    assert "RETIRING" in row_a and "RETIRING" not in row_b
    assert "  shop/a: ADS credentials chain to CA generation 1 ..." in lines


def test_untrusted_credentials_fail_the_health_check_retiring_do_not() -> None:
    def status(state: str) -> dict[str, object]:
        stream = {"ads_credentials": {"state": state}}
        return {
            "policy": {},
            "nodes": [{"node": "shop/orders", "drift": False, "streams": [stream]}],
        }

    assert not unhealthy(status(OK))
    assert not unhealthy(status(RETIRING))  # a warning with a deadline, not an outage yet
    assert unhealthy(status(UNTRUSTED))
