# The meshward image: control plane, ext_authz, the demo's echo apps, the tour, and the sidecars
# (`meshward agent`, which runs Envoy: the binary comes from the official image).
FROM python:3.11-slim
COPY --from=envoyproxy/envoy:v1.40.0 /usr/local/bin/envoy /usr/local/bin/envoy

ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    MESHWARD_EXAMPLES=/app/examples

WORKDIR /app
COPY pyproject.toml constraints.txt README.md ./
COPY meshward ./meshward
# xds-protos ships an old copy of opentelemetry-proto's files over the real ones: lay the real
# package down again and prove it (DESIGN.md field notes), exactly as the Makefile does.
RUN pip install -c constraints.txt . \
 && pip install --force-reinstall --no-deps \
      "opentelemetry-proto==$(sed -n 's/^opentelemetry-proto==//p' constraints.txt)" \
 && python -c "from opentelemetry.proto.trace.v1.trace_pb2 import ScopeSpans" \
 && meshward --help >/dev/null
COPY examples ./examples

# Runs as root: in the demo's compose file these containers share bind mounts (./certs) and
# named volumes (policies, logs) with each other and with the Envoy containers.
CMD ["meshward", "--help"]
