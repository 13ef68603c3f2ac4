"""The installed-wheel tests share the integration tests' engine, store and loopback mirrors."""

from tests.integration.conftest import engine, store  # noqa: F401 - pytest fixtures
