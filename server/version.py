"""The installed distribution's version, one source for ``prefix-serve --version`` and the OpenAPI document."""

from __future__ import annotations

from importlib import metadata


def package_version() -> str:
    """What ``pip install`` recorded for ``prefix-serve`` (not a copy kept in the code)."""
    try:
        return metadata.version("prefix-serve")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"
