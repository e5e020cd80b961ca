"""meshward.compile (see ../shared/DESIGN.md)."""
