"""AdapterForge client SDK and command-line interface (imports nothing server-side)."""

__version__ = "0.1.0"
