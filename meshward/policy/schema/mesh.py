"""The Meshward kinds: MeshConfig and Workload."""

from __future__ import annotations

from typing import Any

from meshward.policy.model import (
    DEFAULT_ROOT_NAMESPACE,
    DEFAULT_TRUST_DOMAIN,
    DenialDetails,
    Enforcement,
    JwtEnforcement,
    MeshConfig,
    Protocol,
    Workload,
    WorkloadPort,
)
from meshward.policy.schema.base import (
    DNS_LABEL,
    DNS_SUBDOMAIN,
    KUBERNETES_METADATA,
    METADATA_FIELDS,
    TRUST_DOMAIN,
    DocumentReader,
    is_ip,
    port_value,
    type_name,
)


class MeshSchema(DocumentReader):
    def mesh_config(self) -> MeshConfig:
        data = self.doc.data
        self.mapping(data, "", ("apiVersion", "kind", "metadata", "spec"))
        self.mapping(data.get("metadata"), "metadata", METADATA_FIELDS, ignored=KUBERNETES_METADATA)
        spec = self.mapping(
            data.get("spec"),
            "spec",
            ("trustDomain", "rootNamespace", "denialDetails", "jwtEnforcement", "enforcement"),
        )
        trust_domain = DEFAULT_TRUST_DOMAIN
        root = DEFAULT_ROOT_NAMESPACE
        if "trustDomain" in spec:
            trust_domain = (
                self.name(spec["trustDomain"], "spec.trustDomain", TRUST_DOMAIN, "trust domain")
                or DEFAULT_TRUST_DOMAIN
            )
        if "rootNamespace" in spec:
            root = (
                self.name(spec["rootNamespace"], "spec.rootNamespace", DNS_LABEL, "namespace")
                or DEFAULT_ROOT_NAMESPACE
            )
        details = DenialDetails.QUIET
        text = self.string(spec.get("denialDetails"), "spec.denialDetails")
        if text is not None:
            try:
                details = DenialDetails(text)
            except ValueError:
                self.error(
                    "spec.denialDetails",
                    f"{text!r} is not one of {', '.join(d.value for d in DenialDetails)}",
                )
        enforcement = JwtEnforcement.NATIVE
        text = self.string(spec.get("jwtEnforcement"), "spec.jwtEnforcement")
        if text is not None:
            try:
                enforcement = JwtEnforcement(text)
            except ValueError:
                self.error(
                    "spec.jwtEnforcement",
                    f"{text!r} is not one of {', '.join(e.value for e in JwtEnforcement)}",
                )
        return MeshConfig(
            trust_domain=trust_domain,
            root_namespace=root,
            denial_details=details,
            jwt_enforcement=enforcement,
            audit_namespaces=self.audit_namespaces(spec.get("enforcement")),
        )

    def audit_namespaces(self, value: Any) -> frozenset[str]:
        """``enforcement: {namespaces: {shop: audit, billing: enforce}}``."""
        section = self.mapping(value, "spec.enforcement", ("namespaces",))
        namespaces = section.get("namespaces")
        if namespaces is None:
            return frozenset()
        if not isinstance(namespaces, dict):
            self.error(
                "spec.enforcement.namespaces",
                f"expected a mapping of namespace: audit|enforce, got {type_name(namespaces)}",
            )
            return frozenset()
        audit: set[str] = set()
        for ns, mode in namespaces.items():
            path = f"spec.enforcement.namespaces.{ns}"
            if not isinstance(ns, str) or self.name(ns, path, DNS_LABEL, "namespace") is None:
                continue
            text = self.string(mode, path, required=True)
            if text is None:
                continue
            try:
                chosen = Enforcement(text)
            except ValueError:
                self.error(
                    path, f"{text!r} is not one of {', '.join(e.value for e in Enforcement)}"
                )
                continue
            if chosen is Enforcement.AUDIT:
                audit.add(ns)
        return frozenset(audit)

    def workload(self) -> Workload | None:
        count = len(self.problems)
        name, namespace, labels, _ = self.metadata()
        spec = self.mapping(
            self.doc.data.get("spec"), "spec", ("serviceAccount", "address", "ports")
        )
        service_account = name
        if spec.get("serviceAccount") is not None:
            service_account = (
                self.name(spec["serviceAccount"], "spec.serviceAccount", DNS_SUBDOMAIN, "name")
                or name
            )
        address = "127.0.0.1"
        if spec.get("address") is not None:
            text = self.string(spec["address"], "spec.address", required=True)
            if text is not None:
                if is_ip(text) or DNS_SUBDOMAIN.match(text.lower()):
                    address = text
                else:
                    self.error("spec.address", f"{text!r} is not an IP address or host name")
        ports = self.workload_ports(spec.get("ports"))
        if len(self.problems) > count:
            return None
        return Workload(
            namespace=namespace,
            name=name,
            labels=labels,
            service_account=service_account,
            address=address,
            ports=ports,
            origin=self.doc.origin,
        )

    def workload_ports(self, value: Any) -> tuple[WorkloadPort, ...]:
        if value is None:
            return ()
        if not isinstance(value, list):
            self.error("spec.ports", f"expected a list of ports, got {type_name(value)}")
            return ()
        out: list[WorkloadPort] = []
        seen_ports: set[int] = set()
        seen_names: set[str] = set()
        for i, item in enumerate(value):
            path = f"spec.ports[{i}]"
            entry = self.mapping(item, path, ("name", "port", "protocol"))
            raw_port = entry.get("port")
            port = port_value(raw_port) if isinstance(raw_port, int | str) else None
            if port is None or isinstance(raw_port, bool):
                self.error(f"{path}.port", f"{raw_port!r} is not a port number (1-65535)")
                continue
            protocol = Protocol.HTTP
            if entry.get("protocol") is not None:
                text = self.string(entry["protocol"], f"{path}.protocol")
                if text is not None:
                    try:
                        protocol = Protocol(text.upper())
                    except ValueError:
                        self.error(
                            f"{path}.protocol",
                            f"{text!r} is not one of {', '.join(p.value for p in Protocol)}",
                        )
            name = f"{protocol.value.lower()}-{port}"
            if entry.get("name") is not None:
                name = self.name(entry["name"], f"{path}.name", DNS_LABEL, "port name") or name
            if port in seen_ports:
                self.error(f"{path}.port", f"port {port} is listed twice")
            if name in seen_names:
                self.error(f"{path}.name", f"port name {name!r} is listed twice")
            seen_ports.add(port)
            seen_names.add(name)
            out.append(WorkloadPort(name=name, port=port, protocol=protocol))
        return tuple(out)

    # ---- security.istio.io
