"""AdapterForge's command-line interface (``adapterforge``); the client SDK is not built yet. Importing
the package imports nothing server-side: each command imports what it runs."""

__version__ = "0.1.0"
