"""Meshward: identity-based micro-segmentation for Envoy sidecars."""

__version__ = "0.1.0"
