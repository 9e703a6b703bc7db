"""The two exceptions of secure aggregation: a bad message or state (:class:`SecAggError`, the
message names the node) and a session that cannot complete (:class:`SecAggAbort`)."""

from __future__ import annotations


class SecAggError(ValueError):
    """A secure-aggregation message or state is invalid; the message names the node."""


class SecAggAbort(SecAggError):
    """The session cannot complete (fewer than ``t`` clients left at some stage)."""
