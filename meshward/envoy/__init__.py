"""Everything about running a real Envoy: finding the binary, bootstraps, processes.

One implementation used by the demo, the tests and the benchmarks.
"""

from meshward.envoy.binary import envoy_version, find_envoy
from meshward.envoy.process import EnvoyProcess, EnvoyStartError

__all__ = ["EnvoyProcess", "EnvoyStartError", "envoy_version", "find_envoy"]
