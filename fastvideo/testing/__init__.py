"""Helpers that build tiny random-weight models, for tests, demos and benchmarks."""
