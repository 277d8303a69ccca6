"""The broker's version, from the installed package's metadata, read on first use:
importlib.metadata costs ~15 ms that a socket-activated start should not wait for."""

from __future__ import annotations

import functools

UNKNOWN = "unknown (not installed)"


@functools.cache
def broker_version() -> str:
    """A checkout run without `pip install` has no metadata: say so, rather than fail."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("xsk-broker")
    except PackageNotFoundError:
        return UNKNOWN
