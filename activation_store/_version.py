"""The package version, read once from the installed metadata (written only in pyproject.toml)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("activation-store")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
