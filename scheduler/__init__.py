"""Control plane: HTTP API, database models, admission, dispatch and the local dev stack."""
