"""The HTTP API (OpenAI Videos compatible). See README.md in this folder."""
