"""AdapterForge Celery workers: thin train/merge tasks (``worker.tasks``) over the job runner
(``worker.runner``), which trains with ``adapters_core`` on the resident base model
(``worker.model_cache``) and writes results to the registry. Start one per GPU with
``celery -A worker.celery_app worker -Q gpu -c 1`` or ``adapterforge worker``."""
