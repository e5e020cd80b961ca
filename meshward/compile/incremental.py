"""Incremental compile: a policy edit recompiles only the workloads, and the halves of their
config, that it affects; the result is byte-identical to a full compile.

A workload's config has two halves that change for different reasons
(meshward.compile.outbound.Part):

- inbound (its listeners, the RBAC rules in its routes, its local clusters): compiled from the
  workload itself, the policies and RequestAuthentications selecting it (expired ones left out
  at ``now``) and its mTLS modes. An authorization edit recompiles the inbound half of the
  workloads it selects, and no one's outbound half; within the half, a resource whose source
  did not change is the previous proto (an RBAC edit gives a new route, the same listener).
- outbound (a listener, cluster, route and endpoints per peer port it may call): compiled from
  the peers it may call (meshward.compile.peers), each peer's ports and mTLS modes, and the
  registry (the default outbound ports are positions in it). A change of who may call whom
  recompiles the outbound half of the callers whose peer list changed; a peer's port or mTLS
  change, that of its callers.

Pure and explicit: :func:`compile_incremental` takes the previous :class:`CompileState` and
returns the next one; nothing is kept in module globals, nothing is read from a clock (``now`` is
an argument), no I/O, no threads. The state holds a :class:`FragmentCache` whose entries are
keyed by everything they are built from, so states derived from one another may share it.

A workload whose compile fails (e.g. it needs ext_authz and no address was given) is reported
in ``errors`` and left out of ``results``; the control plane keeps its last good config.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from meshward.compile import names
from meshward.compile.fragments import FragmentCache, PeerKey
from meshward.compile.options import CompileOptions
from meshward.compile.outbound import Part, PeerTable, callee_refs, outbound_half
from meshward.compile.peers import mesh_index
from meshward.compile.workload import (
    WorkloadResources,
    assemble,
    compile_inbound,
    earliest,
    outbound_change,
)
from meshward.policy.model import MtlsMode, Workload
from meshward.policy.policyset import PolicySet


@dataclass(frozen=True)
class InboundInputs:
    """Everything the inbound half of one workload is compiled from (besides the options and
    the trust domain, which are the state's)."""

    workload: Workload
    policies: tuple[Any, ...]
    request_authentications: tuple[Any, ...]
    modes: tuple[MtlsMode, ...]


PeerSignature = tuple[Workload, tuple[MtlsMode, ...]]


@dataclass(frozen=True)
class Outbound:
    # refs of the peers it may call (a set: at N services, sorting N refs per workload was a
    # tenth of a mesh-wide edit's compile)
    callees: frozenset[str]
    part: Part


@dataclass(frozen=True)
class Recompiled:
    """What one incremental step recompiled (workload refs)."""

    inbound: frozenset[str] = frozenset()
    outbound: frozenset[str] = frozenset()
    removed: frozenset[str] = frozenset()

    @property
    def workloads(self) -> frozenset[str]:
        """Workloads whose config may have changed (the control plane compares contents)."""
        return self.inbound | self.outbound | self.removed


@dataclass(frozen=True)
class CompileState:
    """The result of a compile and what the next incremental one reuses."""

    policy_set: PolicySet
    options: CompileOptions
    now: datetime | None
    results: Mapping[str, WorkloadResources]  # by workload ref (failed ones left out)
    errors: Mapping[str, str]  # ref -> "ErrorType: message"
    inbound: Mapping[str, tuple[InboundInputs, Part]] = field(repr=False)
    outbound: Mapping[str, Outbound] = field(repr=False)
    peers: Mapping[str, PeerSignature] = field(repr=False)
    registry: tuple[str, ...] = field(repr=False)  # sorted peer keys: the outbound ports
    fragments: FragmentCache = field(repr=False)


def _modes(policy_set: PolicySet, workload: Workload) -> tuple[MtlsMode, ...]:
    return tuple(
        policy_set.mtls_mode(workload, p.port) for p in sorted(workload.ports, key=lambda p: p.port)
    )


def _inbound_inputs(
    policy_set: PolicySet, workload: Workload, now: datetime | None
) -> InboundInputs:
    return InboundInputs(
        workload=workload,
        policies=policy_set.policies_for(workload, now),
        request_authentications=policy_set.request_authentications_for(workload),
        modes=_modes(policy_set, workload),
    )


def compile_incremental(
    policy_set: PolicySet,
    options: CompileOptions | None = None,
    *,
    now: datetime | None = None,
    previous: CompileState | None = None,
) -> tuple[CompileState, Recompiled]:
    """Compile ``policy_set``, reusing from ``previous`` every half whose inputs are unchanged.

    ``previous`` None (or compiled with other options or another trust domain): a full
    compile. ``results`` equal :func:`meshward.compile.compile_mesh` with the same arguments,
    byte for byte.
    """
    options = options or CompileOptions()
    trust_domain = policy_set.mesh.trust_domain
    if (
        previous is not None
        and previous.options == options
        and previous.policy_set.mesh == policy_set.mesh
    ):
        base = previous
        fragments = previous.fragments
    else:
        base = None
        fragments = FragmentCache(options)
    registry = tuple(
        sorted(names.peer_key(w, p.port) for w in policy_set.workloads for p in w.ports)
    )
    index = {key: i for i, key in enumerate(registry)}
    peers = {w.ref: (w, _modes(policy_set, w)) for w in policy_set.workloads}
    all_outbound = base is None or base.registry != registry
    changed_peers = set(peers) if base is None else _changed(base.peers, peers)

    results: dict[str, WorkloadResources] = {}
    errors: dict[str, str] = {}
    inbound_parts: dict[str, tuple[InboundInputs, Part]] = {}
    outbound_parts: dict[str, Outbound] = {}
    did_inbound: set[str] = set()
    did_outbound: set[str] = set()
    mesh = mesh_index(policy_set, now)  # built once per compile, passed down (no global memo)
    change = outbound_change(mesh, options, now)
    table = PeerTable(policy_set, options, index)  # per-peer outbound work, once per compile
    for workload in policy_set.workloads:
        ref = workload.ref
        try:
            inputs = _inbound_inputs(policy_set, workload, now)
            old_in = base.inbound.get(ref) if base is not None else None
            if old_in is not None and old_in[0] == inputs:
                inbound = old_in[1]
            else:
                memo = dict(old_in[1].parsed) if old_in is not None else {}
                inbound = compile_inbound(policy_set, workload, options, now=now, memo=memo)
                did_inbound.add(ref)
            refs = callee_refs(policy_set, workload, mesh) if options.outbound else set()
            callees = frozenset(refs)
            old_out = base.outbound.get(ref) if base is not None else None
            if (
                not all_outbound
                and old_out is not None
                and old_out.callees == callees
                and changed_peers.isdisjoint(callees)
            ):
                outbound = old_out
            else:
                part = outbound_half(
                    policy_set, workload, options, mesh, fragments, table, now=now, refs=refs
                )
                outbound = Outbound(callees, part)
                did_outbound.add(ref)
        except Exception as exc:  # one workload's failure must not stop the mesh's compile
            errors[ref] = f"{type(exc).__name__}: {exc}"
            continue
        inbound_parts[ref] = (inputs, inbound)
        outbound_parts[ref] = outbound
        old_result = base.results.get(ref) if base is not None else None
        if old_result is not None and ref not in did_inbound and ref not in did_outbound:
            next_change = earliest(inbound.next_change, change)
            if (old_result.policy_version, old_result.next_change) != (
                policy_set.version,
                next_change,
            ):
                old_result = dataclasses.replace(
                    old_result, policy_version=policy_set.version, next_change=next_change
                )
            results[ref] = old_result
        else:
            results[ref] = assemble(
                workload,
                policy_set.version,
                options,
                inbound,
                outbound.part,
                outbound_change=change,
            )
    removed = frozenset(base.results) - frozenset(results) if base is not None else frozenset()
    fragments.retain(lambda key: _live(key, peers, trust_domain), peers)
    state = CompileState(
        policy_set=policy_set,
        options=options,
        now=now,
        results=results,
        errors=errors,
        inbound=inbound_parts,
        outbound=outbound_parts,
        peers=peers,
        registry=registry,
        fragments=fragments,
    )
    return state, Recompiled(frozenset(did_inbound), frozenset(did_outbound), removed)


def _live(key: PeerKey, peers: Mapping[str, PeerSignature], trust_domain: str) -> bool:
    """A fragment built for a peer port as it is now (not an earlier version of the peer)."""
    peer, port, mode, domain = key
    signature = peers.get(peer.ref)
    if signature is None or domain != trust_domain or signature[0] != peer:
        return False
    ports = sorted(peer.ports, key=lambda p: p.port)
    return port in ports and signature[1][ports.index(port)] is mode


def _changed(old: Mapping[str, PeerSignature], new: Mapping[str, PeerSignature]) -> set[str]:
    """Refs whose peer signature (workload, mTLS modes) differs, including added and removed."""
    out = {ref for ref, sig in new.items() if old.get(ref) != sig}
    out.update(ref for ref in old if ref not in new)
    return out


__all__ = ["CompileState", "InboundInputs", "Recompiled", "compile_incremental"]
