"""MeshConfig spec.denialDetails (issue 13): quiet by default, verbose on request, anything else
an error; the default leaves every existing policy version unchanged."""

from __future__ import annotations

import pytest

from meshward.policy import PolicyError, parse
from meshward.policy.model import DenialDetails

MESH = """\
apiVersion: meshward.dev/v1
kind: MeshConfig
metadata: {name: mesh}
spec: {trustDomain: cluster.local%s}
"""


def test_quiet_is_the_default_and_keeps_versions() -> None:
    plain = parse({"m.yaml": MESH % ""})
    quiet = parse({"m.yaml": MESH % ", denialDetails: quiet"})
    verbose = parse({"m.yaml": MESH % ", denialDetails: verbose"})
    assert plain.mesh.denial_details is DenialDetails.QUIET
    assert verbose.mesh.denial_details is DenialDetails.VERBOSE
    assert plain.version == quiet.version != verbose.version


def test_an_unknown_value_is_an_error_naming_the_choices() -> None:
    with pytest.raises(PolicyError, match="quiet, verbose"):
        parse({"m.yaml": MESH % ", denialDetails: loud"})
