"""The shared core of the service, below both planes: settings, the database (models,
sessions, transitions, migrations), storage, the served-models config, the queue (Celery
configuration and publishing) and the typed job record. It imports nothing from the API,
the scheduler, the worker, the tools or the engine."""
