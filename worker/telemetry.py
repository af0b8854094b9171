"""What a worker says of itself at each beat (``Worker.stats``, shown by the console and
exported by the API's /metrics: the scrape config names the API only).

- ``gpus``: each GPU of the worker's group, from NVML (nvidia-ml-py): name, memory used
  and total, utilisation, temperature. Empty on a CPU worker or where NVML is missing.
- ``job_workers``: the ids its pool children run jobs under (``host:pid:group``, the
  ``Job.worker_id`` they write), so the console can tell which jobs are this worker's.

Read in the Celery main process, which owns no job: NVML needs no CUDA context, and the
children are found through ``/proc`` (Linux; elsewhere none are listed).
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_MIB = 1024 * 1024


def gpu_indices(gpus: str | None) -> list[int] | None:
    """The NVML indices of the group ("0,1" -> [0, 1]); None: every GPU NVML sees."""
    if not gpus:
        return None
    return [int(g) for g in gpus.split(",") if g.strip().isdigit()]


def gpu_stats(indices: list[int] | None) -> list[dict[str, Any]]:
    """One dict per GPU; [] when NVML is not there (no driver, or no nvidia-ml-py)."""
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return []
    try:
        wanted = range(pynvml.nvmlDeviceGetCount()) if indices is None else indices
        stats = []
        for index in wanted:
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            name = pynvml.nvmlDeviceGetName(handle)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            rates = pynvml.nvmlDeviceGetUtilizationRates(handle)
            stats.append(
                {
                    "index": index,
                    "name": name.decode() if isinstance(name, bytes) else str(name),
                    "memory_used_mib": int(memory.used // _MIB),
                    "memory_total_mib": int(memory.total // _MIB),
                    "utilization_pct": int(rates.gpu),
                    "temperature_c": int(
                        pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU)
                    ),
                }
            )
        return stats
    except pynvml.NVMLError as err:
        log.warning("NVML: %s", err)
        return []
    finally:
        pynvml.nvmlShutdown()


def child_pids(pid: int | None = None) -> list[int]:
    """The direct children of ``pid`` (this process), from /proc."""
    pid = pid or os.getpid()
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            children += [int(p) for p in task.read_text().split()]
        except OSError:
            continue
    return sorted(set(children))


def job_worker_ids(group: str) -> list[str]:
    """The ``Job.worker_id`` of each pool child (``worker.runner.make_worker_id``)."""
    host = socket.gethostname()
    return [f"{host}:{pid}:{group}" for pid in child_pids()]


def collect(gpus: str | None, device: str | None) -> dict[str, Any]:
    group = gpus or device or "auto"
    on_gpu = device != "cpu"
    return {
        "gpus": gpu_stats(gpu_indices(gpus)) if on_gpu else [],
        "job_workers": job_worker_ids(group),
    }
