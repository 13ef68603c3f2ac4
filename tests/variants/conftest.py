"""sd-demo's documented variants, built for real (`make test-variants`; not part of `make test`: the cu128
variant alone downloads about 4 GB). The engine and the base image come from the integration fixtures."""

from pathlib import Path

import pytest

from tests.integration.conftest import engine, store  # noqa: F401 - fixtures used by the tests here

VARIANTS = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    """Collected by a bare `pytest` (testpaths) but run only when named: the cu128 variant downloads about 4 GB,
    and `make test` leaves it out."""
    if config.args_source != pytest.Config.ArgsSource.TESTPATHS:
        return
    skip = pytest.mark.skip(reason="builds sd-demo's cu128 variant (about 4 GB to download): run it by name, "
                                   "`make test-variants` or `pytest tests/variants`")
    for item in items:
        if VARIANTS in item.path.parents:
            item.add_marker(skip)
