"""Worker steps: plain functions taking a session and ports; Celery tasks are thin wrappers."""
