"""The package version, importable without loading the rest of medgen."""

__version__ = "0.1.0"
