"""Start one GPU worker: one Celery consumer for one GPU group, on queue ``gpu.<pool>``.

    python -m worker.main --gpus 0          # GPU 0 (CUDA_VISIBLE_DEVICES=0)
    python -m worker.main --gpus 2,3        # a group of two GPUs
    python -m worker.main --device cpu      # no GPU at all

Settings come from the environment (``FVB_*``, see ``fvb_core/settings.py``). The Celery
parent process only talks to Redis; it never imports torch. Jobs run in its prefork child
(concurrency 1), which is the only process that initialises CUDA, on the GPUs named by
``CUDA_VISIBLE_DEVICES`` (set here, before any fork). If that child is killed, Celery puts
the message back (``task_reject_on_worker_lost``) and starts a new child; the job's heartbeat
stops and the scheduler's reaper requeues it as a new attempt.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys

from fvb_core.models_config import pool_gpus
from fvb_core.queue import queue_for_pool
from fvb_core.settings import Settings, get_settings

log = logging.getLogger(__name__)


def _configure_logging(level: str, fmt: str) -> None:
    from fvb_core import logs

    logs.configure(level, fmt, sys.stderr)


def run_worker(
    settings: Settings,
    gpus: str | None = None,
    device: str | None = None,
    concurrency: int = 1,
    loglevel: str = "INFO",
) -> None:
    """Run a Celery worker for one GPU group until it is told to stop (blocks).

    ``gpus`` is a CUDA device list ("0" or "0,1"); ``device="cpu"`` forces CPU and hides every
    GPU. Defaults come from ``settings.worker_gpus`` / ``settings.worker_device``.
    """
    gpus = gpus if gpus is not None else settings.worker_gpus
    device = device if device is not None else settings.worker_device
    if "torch" in sys.modules:
        import torch

        if torch.cuda.is_initialized():
            raise RuntimeError("CUDA was initialised before the worker chose its GPUs")
    if device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        gpus = None
    elif gpus:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpus
        device = device or "cuda"
    settings = settings.model_copy(update={"worker_gpus": gpus, "worker_device": device})
    group_size = len([g for g in (gpus or "").split(",") if g.strip()])
    declared = pool_gpus(settings.models_config, settings.worker_pool)
    if declared is not None and device != "cpu" and group_size != declared:
        raise ValueError(
            f"pool '{settings.worker_pool}' is declared with {declared} GPU(s) per worker "
            f"([pools.{settings.worker_pool}] in {settings.models_config}), but this worker "
            f"owns {group_size} (--gpus {gpus}): jobs are routed by that count"
        )
    # Weight-loading progress bars would land in the worker log as warnings, once per load.
    os.environ.setdefault("TQDM_DISABLE", "1")
    _configure_logging(loglevel, settings.log_format)

    from worker.celery_app import create_app

    app = create_app(settings)
    queue = queue_for_pool(settings.worker_pool)
    group = (gpus or device or "auto").replace(",", "-")
    node = f"fvb-{settings.worker_pool}-{group}-{os.getpid()}@{socket.gethostname()}"
    log.info("worker %s: queue %s, device %s, gpus %s", node, queue, device or "auto", gpus)
    from worker.presence import Presence

    Presence(settings, node, gpus=group_size).connect()
    app.worker_main(
        [
            "worker",
            "--pool=prefork",
            f"--concurrency={concurrency}",
            f"--queues={queue}",
            f"--hostname={node}",
            f"--loglevel={loglevel.upper()}",
            # No broadcast chatter between workers: nothing here uses it, and it slows start-up.
            "--without-gossip",
            "--without-mingle",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m worker.main", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--gpus", default=None, help='CUDA devices of this worker, e.g. "0" or "0,1"'
    )
    parser.add_argument("--device", default=None, help='"cpu" to run without a GPU')
    parser.add_argument("--pool", default=None, help="GPU pool (queue gpu.<pool>); FVB_WORKER_POOL")
    parser.add_argument("--concurrency", type=int, default=1, help="job processes (default 1)")
    parser.add_argument("--loglevel", default="INFO")
    ns = parser.parse_args(argv)
    settings = get_settings()
    if ns.pool:
        settings = settings.model_copy(update={"worker_pool": ns.pool})
    run_worker(
        settings, gpus=ns.gpus, device=ns.device, concurrency=ns.concurrency, loglevel=ns.loglevel
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
