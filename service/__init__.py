"""Gatekeeper: a local gatekeeper for AI agents."""

__version__ = "0.1.0"
