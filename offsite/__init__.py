"""Offsite: federated offsite-tuning. Packages: offsite.emulator (the method), offsite.protocol
(what crosses the wire), offsite.client (data owner), offsite.cloud (operator)."""

__version__ = "0.1.0"
