"""meshward.extauthz (see ../shared/DESIGN.md)."""
