"""modeltailor: find how to compress a trained network for one edge device."""

__version__ = "0.1.0"
