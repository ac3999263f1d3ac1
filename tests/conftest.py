"""Fixtures shared by test folders: the real stack (controller, worker, gateway processes), started
once per session for tests/integration and tests/e2e alike."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.integration.conftest import Stack, make_stack


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    running = make_stack(tmp_path_factory.mktemp("stack-logs"))
    try:
        running.start()
        yield running
    except BaseException:
        running.dump_logs()
        raise
    finally:
        running.stop()
