"""Helpers outside the request path: ``tiny_wan`` builds tiny random-weight Wan2.1 folders (the
local stack's demo models, tests, benchmarks); ``distributed.run_on_ranks`` runs a function on
N ranks (tests, ``bench/vae.py``). Test-only rank functions live in ``tests/engine_checks/``,
full-size random-weight folders in ``bench/random_wan.py``."""
