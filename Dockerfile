# One image for api, scheduler and worker; docker-compose.yml picks the command.
# torch from PyPI carries its CUDA libraries, so the worker needs only the NVIDIA runtime.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
RUN apt-get update && apt-get install -y --no-install-recommends libgl1 && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY pyproject.toml README.md alembic.ini ./
COPY fastvideo ./fastvideo
COPY scheduler ./scheduler
COPY worker ./worker
COPY migrations ./migrations
RUN pip install "torch>=2.5,<3" && pip install ".[service]"

EXPOSE 8000
CMD ["fvb", "api"]
