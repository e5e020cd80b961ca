"""meshward.certs (see ../shared/DESIGN.md)."""
