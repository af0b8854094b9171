"""Find pipeline classes by name.

Two sources: every package under ``fastvideo/pipelines/`` (each module that defines
``EntryClass``, a class or a list of classes), and installed distributions that declare an
entry point in the ``fastvideo.pipelines`` group (pointing at a class, a list, or a module
with ``EntryClass``), so third-party pipelines need no change to this tree.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import pkgutil
from types import ModuleType

import fastvideo.pipelines
from fastvideo.logger import init_logger

logger = init_logger(__name__)

ENTRY_POINT_GROUP = "fastvideo.pipelines"
_NOT_PIPELINE_PACKAGES = {"stages"}

_registry: dict[str, type] | None = None


def _entry_classes(obj: object) -> list[type]:
    if isinstance(obj, ModuleType):
        obj = getattr(obj, "EntryClass", None)
    if obj is None:
        return []
    classes = obj if isinstance(obj, list | tuple) else [obj]
    return [c for c in classes if isinstance(c, type)]


def _register(registry: dict[str, type], cls: type, source: str) -> None:
    existing = registry.get(cls.__name__)
    if existing is not None and existing is not cls:
        logger.warning(
            "pipeline %s from %s ignored: %s.%s already has that name",
            cls.__name__,
            source,
            existing.__module__,
            existing.__name__,
        )
        return
    registry[cls.__name__] = cls


def _scan_pipeline_packages(registry: dict[str, type]) -> None:
    root = fastvideo.pipelines
    for info in pkgutil.iter_modules(root.__path__):
        if not info.ispkg or info.name in _NOT_PIPELINE_PACKAGES:
            continue
        package = importlib.import_module(f"{root.__name__}.{info.name}")
        modules = [package] + [
            importlib.import_module(f"{package.__name__}.{sub.name}")
            for sub in pkgutil.walk_packages(package.__path__)
        ]
        for module in modules:
            for cls in _entry_classes(module):
                _register(registry, cls, module.__name__)


def _scan_entry_points(registry: dict[str, type]) -> None:
    for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            loaded = entry_point.load()
        except Exception as err:
            logger.warning("pipeline entry point %s failed to load: %s", entry_point.value, err)
            continue
        for cls in _entry_classes(loaded):
            _register(registry, cls, f"entry point {entry_point.value}")


def pipeline_classes(refresh: bool = False) -> dict[str, type]:
    """All known pipelines by class name (scanned once per process unless ``refresh``)."""
    global _registry
    if _registry is None or refresh:
        registry: dict[str, type] = {}
        _scan_pipeline_packages(registry)
        _scan_entry_points(registry)
        _registry = registry
    return dict(_registry)


def get_pipeline_class(name: str) -> type:
    classes = pipeline_classes()
    if name not in classes:
        classes = pipeline_classes(refresh=True)
    if name not in classes:
        raise ValueError(f"pipeline {name!r} is not registered; known pipelines: {sorted(classes)}")
    return classes[name]
