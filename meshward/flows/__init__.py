"""Flows: what every sidecar saw, collected over Envoy's gRPC access log service (ALS).

- :mod:`meshward.flows.records`: one ALS entry -> one :class:`FlowRecord` (pure).
- :mod:`meshward.flows.paths`: path templates (``/orders/42`` -> ``/orders/{*}``, pure).
- :mod:`meshward.flows.collector`: the ALS gRPC service in the control plane (mTLS; a node
  reports only its own workload's flows).
- :mod:`meshward.flows.store`: aggregation per time bucket and the bounded SQL store
  (SQLite by default, PostgreSQL for replicas), through SQLAlchemy Core.
- :mod:`meshward.flows.query`: the admin endpoints ``/flows`` and ``/denials``.
- :mod:`meshward.flows.reach` / :mod:`meshward.flows.report` / :mod:`meshward.flows.html`:
  reachability and blast radius under the policy set (the evaluator over every workload pair),
  the report joining them with the flow store's totals, and its HTML page (all pure);
  :mod:`meshward.flows.report_service` serves it at ``/report``, ``meshward report`` reads it.
- :mod:`meshward.flows.evidence` / :mod:`meshward.flows.denials`: who decided a request, read
  from access-log lines and the ext_authz decision log (pure; the demo's ``meshward denials``
  without ``--xds`` reads files with them).
"""
