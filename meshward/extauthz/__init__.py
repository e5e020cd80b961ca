"""meshward.extauthz: Envoy's ext_authz Check for the rules native RBAC cannot decide (verified
end-user JWTs, CUSTOM policies), with a decision cache, clear denials, spans and decision logs.

Modules, each with one job (this package imports nothing heavy, so ``meshward --help`` stays fast):

- ``plan``        which request attributes a workload's policies read: the cache key (pure).
- ``tokens``      locating and verifying JWTs per RequestAuthentication; JWKS sources.
- ``cache``       the decision cache (LRU bounded in bytes, hashed keys, per-entry expiry, one
                  computation per key).
- ``callers``     who may ask: mTLS credentials and the caller gate (own workload only).
- ``authorizer``  one Check without gRPC: workload, identity, decision, CheckResponse.
- ``response``    CheckResponse builders (allow headers, JSON denials, dynamic metadata).
- ``service``     the handler both gRPC servers call: span, metrics, decision log, fail closed.
- ``server``      ``ExtAuthzServer`` (sync or aio), ``start_service``/``run``, ``--workers``.
- ``metrics``     Prometheus metrics and the ``/metrics`` endpoint.
- ``decisionlog`` JSON lines per denial / dry-run / AUDIT.
- ``envoyconfig`` a static Envoy sidecar with the ext_authz filter (tests, bench, by hand).
- ``client``      building CheckRequests like Envoy and reading CheckResponses.
- ``cli``         ``meshward extauthz serve|check``.

In-process (the demo, tests)::

    from meshward.extauthz.server import ServeOptions, start_service
    running = start_service(ServeOptions(policy_paths=[Path("examples")], port=0, tls_dir=svid_dir))
    running.port  # point the sidecars' meshward-extauthz cluster here (mTLS)
    running.stop()

As a process: ``meshward extauthz serve --policy DIR --tls-dir SVID_DIR --listen 127.0.0.1:0 --ready-file F``
prints (and writes to F) one JSON line with ``listen`` and ``metrics`` addresses once serving.
"""
