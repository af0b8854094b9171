"""HTTP routes, one module per resource. Thin: parse, call :mod:`scheduler.api.jobs`, shape."""
