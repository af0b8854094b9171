"""Run one request on several ranks: long-lived rank processes fed by the caller.

``VideoGenerator.from_pretrained(path, num_gpus=N)`` with N > 1 builds a
:class:`MultiRankExecutor`, which starts N processes (``python -m
fastvideo.executor.rank_main``, never ``multiprocessing``, so a daemonic caller such as a
Celery pool child may start them) and keeps them up across requests. Each rank joins the
world, builds the parallel groups, then the pipeline, so every layer sees its TP/SP/CFG
coordinates when it is built. Rank 0 takes each request from the caller over a private
socket pair and broadcasts it; every rank runs the pipeline; rank 0 sends the frames back.
The caller never initialises CUDA.

``executor.py`` is the caller's side, ``rank_main.py`` the ranks' side. May import the rest
of ``fastvideo``; within ``fastvideo`` only ``entrypoints.video_generator`` imports it.
"""

from fastvideo.executor.executor import MultiRankExecutor, RankGroupError

__all__ = ["MultiRankExecutor", "RankGroupError"]
