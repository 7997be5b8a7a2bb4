"""imagesmith: build Debian-family system images from a config space of classes."""

__version__ = "0.1.0"
