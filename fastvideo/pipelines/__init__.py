"""Pipelines: ``composed_pipeline_base`` and ``stages`` are the building blocks; every
sub-package here (``wan/``, ``wan_i2v/``, or one you add) registers pipelines through a
module-level ``EntryClass``."""
