"""Kept for imports written before the state file moved to :mod:`meshward.meshstate` (the control
plane's `meshward status` reads it too, and meshward.xds does not import the demo)."""

from meshward.meshstate import (
    FORMAT,
    LAST_ENV,
    STATE_FILE,
    DemoState,
    WorkloadState,
    find_state,
    forget_last,
    last_pointer,
    load,
    record_last,
    save,
    split_outbound,
)

__all__ = [
    "FORMAT",
    "LAST_ENV",
    "STATE_FILE",
    "DemoState",
    "WorkloadState",
    "find_state",
    "forget_last",
    "last_pointer",
    "load",
    "record_last",
    "save",
    "split_outbound",
]
