"""Everything Celery-specific: the app, its settings, the thin tasks and the messages they carry."""
