"""The eval tests that compare with serve use serve's registry world and app fixtures."""

from tests.serve.conftest import client, serve_db, serve_env, world  # noqa: F401
