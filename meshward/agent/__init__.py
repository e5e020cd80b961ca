"""`meshward agent`: the node agent beside each Envoy (the role of Istio's pilot-agent).

It generates the workload key on the node (never sent anywhere), obtains the SVID by CSR from
the control plane's certificate service (first with a one-time join token, then with its current
SVID), serves SVID and trust bundle to its Envoy over SDS on a 0600 Unix socket, renews at half
life with jitter, follows CA rotations, and supervises Envoy.

- :mod:`meshward.agent.identity`: key, CSR, the credentials kept on disk (0600).
- :mod:`meshward.agent.certclient`: Join / Renew / Bundle calls (grpclib + stdlib TLS).
- :mod:`meshward.agent.sds`: the SotW SDS server on the Unix socket.
- :mod:`meshward.agent.bootstrap`: the Envoy bootstrap (SDS from the socket, ADS with that SVID).
- :mod:`meshward.agent.envoyproc`: start, restart with backoff, adopt, drain Envoy.
- :mod:`meshward.agent.run`: the agent's main loop; :mod:`meshward.agent.cli` its command.
"""
