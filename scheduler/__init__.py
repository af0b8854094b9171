"""The control plane: the HTTP API and the scheduler process (release, reaper)."""
