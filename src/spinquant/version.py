"""The package version (one place; exporters stamp it into the files they write)."""

__version__ = "0.1.0"
