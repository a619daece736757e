"""The serve service: the REST API over the registry's champion (FastAPI, uvicorn)."""
