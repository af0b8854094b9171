"""One logger configuration for the engine: ``FASTVIDEO_LOG_LEVEL`` sets the level."""

from __future__ import annotations

import logging

from fastvideo import envs

_configured = False


def init_logger(name: str) -> logging.Logger:
    global _configured
    if not _configured:
        root = logging.getLogger("fastvideo")
        if not root.handlers:
            handler = logging.StreamHandler()
            handler.setFormatter(
                logging.Formatter("%(levelname)s %(asctime)s %(name)s: %(message)s")
            )
            root.addHandler(handler)
        root.setLevel(envs.FASTVIDEO_LOG_LEVEL.get())
        root.propagate = False
        _configured = True
    return logging.getLogger(name)
