"""modeltailor: find how to compress a trained network for one edge device."""

__version__ = "0.1.0"

from modeltailor.client import Client

__all__ = ["Client", "__version__"]
