"""AdapterForge Celery workers (train, merge): thin tasks over ``adapters_core``. Arrives in its own issue."""
