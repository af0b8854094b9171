"""The data plane: Celery GPU workers that run ``fastvideo`` pipelines (see README.md).

Nothing here imports torch at import time: the Celery parent process must never touch CUDA;
only the pool child that runs jobs loads the engine.
"""
