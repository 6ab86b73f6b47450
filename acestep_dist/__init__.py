"""acestep-dist: distributed data prep and fine-tuning for ACE-Step music models."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("acestep-dist")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+src"
