"""sd-demo's documented variants, built for real (`make test-variants`; not part of `make test`: the cu128
variant alone downloads about 4 GB). The engine and the base image come from the integration fixtures."""

from tests.integration.conftest import engine, store  # noqa: F401 - fixtures used by the tests here
