"""The HQ-CLIP self-amplifying cycle."""

__version__ = "0.1.0"
