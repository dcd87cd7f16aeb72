"""AdapterForge HTTP service (FastAPI): API, SQL registry, artifact store, serving. Arrives in its own issue."""
