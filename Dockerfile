# One image for api, scheduler and worker; docker-compose.yml picks the command.
# torch's CUDA wheels carry their CUDA libraries, so the worker needs only the NVIDIA runtime
# (and a driver recent enough for TORCH_INDEX_URL's CUDA: cu130 needs driver 580 or newer).
#
#   docker build .                                                  # torch 2.11.0, CUDA 13.0
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
#                    (older drivers; with a TORCH_VERSION that index publishes)
#   docker build --build-arg FLASH_ATTN_VERSION=2.8.3 .            # with flash-attn
#
# Base image pinned to a full version on purpose (like the images in docker-compose.yml).
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm
FROM ${PYTHON_IMAGE}

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update && apt-get install -y --no-install-recommends libgl1 && rm -rf /var/lib/apt/lists/*

# The processes run as this user, never as root.
RUN useradd --create-home --uid 10001 --user-group fvb

WORKDIR /app

# Dependencies first, each in its own layer, so that editing the source rebuilds none of them.
# torch: pinned to a CUDA build (the one bench/RESULTS.md measured on the H200s).
ARG TORCH_VERSION=2.11.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

# Every other dependency, read from pyproject.toml alone (the core list and the service
# extra); torch's requirement there is already met by the build above.
COPY pyproject.toml ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; print('\n'.join(p['dependencies'] + p['optional-dependencies']['service']))" > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# flash-attn: optional, off by default (the engine falls back to torch's SDPA without it).
# Its setup fetches a prebuilt wheel matching this torch / CUDA / Python where one is
# published, and otherwise compiles, which needs nvcc (not in this slim base image).
ARG FLASH_ATTN_VERSION=""
RUN if [ -n "${FLASH_ATTN_VERSION}" ]; then \
        pip install packaging ninja psutil setuptools wheel \
        && pip install --no-build-isolation "flash-attn==${FLASH_ATTN_VERSION}"; \
    fi

# Then the source. Editable on purpose: `fvb db upgrade` finds migrations/ beside the
# core package (fvb_core/db/migrate.py), which a site-packages install would not have.
COPY README.md alembic.ini ./
COPY fastvideo ./fastvideo
COPY fvb_core ./fvb_core
COPY scheduler ./scheduler
COPY worker ./worker
COPY fvb_tools ./fvb_tools
COPY migrations ./migrations
RUN pip install --no-deps -e ".[service]"

USER fvb

EXPOSE 8000
# For the default command (the API): ready once the database, broker and store answer.
# docker-compose.yml gives the scheduler and the worker checks of their own.
HEALTHCHECK --interval=15s --timeout=8s --start-period=30s --retries=4 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('FVB_API_PORT', '8000'), timeout=5)"]
CMD ["fvb", "api"]
