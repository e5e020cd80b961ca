"""The compile-time shortcuts (patched outbound listener templates, shared peer resources) give
exactly the bytes of the plain dict -> proto conversion."""

from __future__ import annotations

from typing import Any

import pytest

from meshward.compile import (
    CompileOptions,
    Endpoint,
    Mode,
    compile_mesh,
    compile_workload,
    listeners,
    synth,
)
from meshward.compile import protos as _protos
from meshward.compile.workload import _listener
from meshward.policy.model import MtlsMode


@pytest.mark.parametrize("mode", [Mode.XDS, Mode.STATIC])
def test_patched_outbound_listeners_equal_parsed_ones(mode: Mode) -> None:
    policy_set = synth.random_policy_set(5, synth.Profile(mtls=MtlsMode.STRICT), tcp=True)
    options = CompileOptions(
        mode=mode, access_log_path="/tmp/a.log", otlp=Endpoint("127.0.0.1", 4317)
    )
    caller = policy_set.workload("shop/web")
    assert caller is not None
    memo: dict[tuple[str, str], Any] = {}
    checked = 0
    for index, peer in enumerate(w for w in policy_set.workloads if w.ref != caller.ref):
        for port in peer.ports:
            built = listeners.outbound(
                caller,
                peer,
                port,
                bind=Endpoint("127.0.0.1", 15000 + index),
                peer_mode=MtlsMode.STRICT,
                options=options,
                trust_domain=synth.TRUST_DOMAIN,
            )
            fast = _listener(memo, built).SerializeToString(deterministic=True)
            plain = _protos.listener(built.listener).SerializeToString(deterministic=True)
            assert fast == plain, (peer.ref, port.port)
            checked += 1
    assert checked >= 6  # HTTP and TCP peers, several of each


def test_mesh_compile_equals_workload_by_workload_compile() -> None:
    policy_set = synth.scale_policy_set(30, 120)
    options = CompileOptions(extauthz=Endpoint("127.0.0.1", 9191))
    mesh = compile_mesh(policy_set, options)
    for ref in ("team-000/svc-0003", "team-002/svc-0029"):
        alone = compile_workload(policy_set, ref, options)
        assert mesh[ref].serialize() == alone.serialize()
