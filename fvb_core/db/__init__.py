"""The database: models (the schema Alembic migrates), sessions, and the job state machine.

Shared by the API, the scheduler and the workers; nothing here imports fastvideo or Celery.
"""
