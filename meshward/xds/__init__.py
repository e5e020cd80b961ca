"""meshward.xds (see ../shared/DESIGN.md)."""
