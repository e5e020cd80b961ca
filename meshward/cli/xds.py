"""`meshward xds`: the control plane's group (meshward/xds/cli.py) with the flow collector
wired in. meshward.xds may not import meshward.flows (flows stands on it), so the process is
composed here, above both: `xds serve --flows-db` runs meshward.flows' collector on the ADS
port through the interface meshward.xds declares (meshward.xds.attached)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from meshward.xds.attached import AttachedServiceFactory


def configure(parser: argparse.ArgumentParser) -> None:
    from meshward.xds.cli import configure as configure_xds

    configure_xds(parser, flows=_flows_for)


def _flows_for(url: str) -> AttachedServiceFactory:
    # imported when `serve` runs, not when the parser is built: SQLAlchemy keeps --help slow
    from meshward.flows.service import flows_for

    return flows_for(url)
