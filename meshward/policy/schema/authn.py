"""PeerAuthentication (mTLS modes) and RequestAuthentication (JWT rules)."""

from __future__ import annotations

import json
import re
from typing import Any

from meshward.policy.model import (
    JwtHeader,
    JwtRule,
    MtlsMode,
    PeerAuthentication,
    RequestAuthentication,
)
from meshward.policy.schema.base import DocumentReader, port_value, type_name
from meshward.policy.vocabulary import HEADER_NAME


class AuthnSchema(DocumentReader):
    def peer_authentication(self) -> PeerAuthentication | None:
        count = len(self.problems)
        name, namespace, _, _ = self.metadata()
        spec = self.mapping(
            self.doc.data.get("spec"), "spec", ("selector", "mtls", "portLevelMtls")
        )
        selector = self.selector(spec.get("selector"), "spec.selector")
        mode = self.mtls_mode(spec.get("mtls"), "spec.mtls")
        port_level: dict[int, MtlsMode] = {}
        raw = spec.get("portLevelMtls")
        if raw is not None:
            if not isinstance(raw, dict):
                self.error(
                    "spec.portLevelMtls",
                    f"expected a mapping of port to mtls, got {type_name(raw)}",
                )
            else:
                if selector is None:
                    self.error(
                        "spec.portLevelMtls",
                        "needs spec.selector (port-level modes apply to selected workloads only)",
                    )
                for key, item in raw.items():
                    port = port_value(key) if isinstance(key, int | str) else None
                    if port is None:
                        self.error(f"spec.portLevelMtls[{key}]", "is not a port number (1-65535)")
                        continue
                    port_level[port] = self.mtls_mode(item, f"spec.portLevelMtls[{key}]")
        if len(self.problems) > count:
            return None
        return PeerAuthentication(
            namespace=namespace,
            name=name,
            selector=selector,
            mode=mode,
            port_level=port_level,
            origin=self.doc.origin,
        )

    def mtls_mode(self, value: Any, path: str) -> MtlsMode:
        data = self.mapping(value, path, ("mode",))
        text = self.string(data.get("mode"), f"{path}.mode")
        if text is None:
            return MtlsMode.UNSET
        try:
            return MtlsMode(text)
        except ValueError:
            self.error(
                f"{path}.mode", f"{text!r} is not one of {', '.join(m.value for m in MtlsMode)}"
            )
            return MtlsMode.UNSET

    def request_authentication(self) -> RequestAuthentication | None:
        count = len(self.problems)
        name, namespace, _, _ = self.metadata()
        spec = self.mapping(
            self.doc.data.get("spec"), "spec", ("selector", "jwtRules", "targetRef", "targetRefs")
        )
        for unsupported in ("targetRef", "targetRefs"):
            if unsupported in spec:
                self.error(f"spec.{unsupported}", "not supported; use spec.selector")
        selector = self.selector(spec.get("selector"), "spec.selector")
        rules: list[JwtRule] = []
        issuers: set[str] = set()
        for i, item in enumerate(self.entries(spec.get("jwtRules"), "spec.jwtRules")):
            rule = self.jwt_rule(item, f"spec.jwtRules[{i}]")
            if rule is None:
                continue
            if rule.issuer in issuers:
                self.error(f"spec.jwtRules[{i}].issuer", f"issuer {rule.issuer!r} is listed twice")
            issuers.add(rule.issuer)
            rules.append(rule)
        if len(self.problems) > count:
            return None
        return RequestAuthentication(
            namespace=namespace,
            name=name,
            selector=selector,
            jwt_rules=tuple(rules),
            origin=self.doc.origin,
        )

    def jwt_rule(self, value: Any, path: str) -> JwtRule | None:
        fields = (
            "issuer",
            "audiences",
            "jwksUri",
            "jwks",
            "fromHeaders",
            "fromParams",
            "outputPayloadToHeader",
            "forwardOriginalToken",
        )
        unsupported = ("fromCookies", "outputClaimToHeaders", "timeout")
        data = self.mapping(value, path, (*fields, *unsupported))
        for field in unsupported:
            if field in data:
                self.error(f"{path}.{field}", "supported by Istio but not (yet) by Meshward")
        issuer = self.string(data.get("issuer"), f"{path}.issuer", required=True)
        audiences = self.str_list(data.get("audiences"), f"{path}.audiences")
        jwks_uri = self.string(data.get("jwksUri"), f"{path}.jwksUri")
        if jwks_uri is not None and not re.match(r"^(https?://[^/\s]+|file:///\S+)", jwks_uri):
            self.error(f"{path}.jwksUri", f"{jwks_uri!r} is not an http(s):// or file:/// URL")
        jwks = self.string(data.get("jwks"), f"{path}.jwks")
        if jwks is not None:
            try:
                parsed = json.loads(jwks)
            except ValueError as exc:
                self.error(f"{path}.jwks", f"not valid JSON: {exc}")
            except RecursionError:
                self.error(f"{path}.jwks", "not a JWKS: JSON nested too deeply")
            else:
                if not isinstance(parsed, dict) or not isinstance(parsed.get("keys"), list):
                    self.error(f"{path}.jwks", 'expected a JWKS object: {"keys": [...]}')
        if jwks is None and jwks_uri is None:
            self.error(path, "set jwks (inline JSON) or jwksUri so tokens can be verified")
        headers: list[JwtHeader] = []
        for i, item in enumerate(self.entries(data.get("fromHeaders"), f"{path}.fromHeaders")):
            entry = self.mapping(item, f"{path}.fromHeaders[{i}]", ("name", "prefix"))
            header = self.string(entry.get("name"), f"{path}.fromHeaders[{i}].name", required=True)
            prefix = self.string(entry.get("prefix"), f"{path}.fromHeaders[{i}].prefix") or ""
            if header is not None:
                if not HEADER_NAME.match(header):
                    self.error(f"{path}.fromHeaders[{i}].name", f"{header!r} is not a header name")
                headers.append(JwtHeader(name=header, prefix=prefix))
        params = self.str_list(data.get("fromParams"), f"{path}.fromParams")
        output = self.string(data.get("outputPayloadToHeader"), f"{path}.outputPayloadToHeader")
        if output is not None and not HEADER_NAME.match(output):
            self.error(f"{path}.outputPayloadToHeader", f"{output!r} is not a header name")
        forward = data.get("forwardOriginalToken", False)
        if not isinstance(forward, bool):
            self.error(f"{path}.forwardOriginalToken", f"expected true or false, got {forward!r}")
            forward = False
        if issuer is None:
            return None
        return JwtRule(
            issuer=issuer,
            audiences=audiences,
            jwks_uri=jwks_uri,
            jwks=jwks,
            from_headers=tuple(headers),
            from_params=params,
            output_payload_to_header=output,
            forward_original_token=forward,
        )
