"""Rank functions and model builders the engine tests share.

Ranks that ``fastvideo.testing.distributed.run_on_ranks`` spawns are fresh interpreters that
import a rank function by its module name, so these live in modules, not in the test files
(``tests/conftest.py`` puts the repository root on ``sys.path`` for them and their ranks).
"""
