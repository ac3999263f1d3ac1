"""Fixtures shared by test folders: the real stack (controller, worker, gateway processes), started
once per session for tests/integration and tests/e2e alike. With CHATFLEET_FAIL_ON_SKIP=1 (set by
`make test`, so CI), a run that skips any test fails: every skip condition can be met on a CI
machine, so a skip there means a test that did not run."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.integration.conftest import Stack, make_stack

FAIL_ON_SKIP_ENV = "CHATFLEET_FAIL_ON_SKIP"


def _skipped(config: pytest.Config) -> int:
    """How many tests (or collected modules) were skipped, when skips fail the run; else 0."""
    if os.environ.get(FAIL_ON_SKIP_ENV) != "1":
        return 0
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    return len(reporter.stats.get("skipped", ())) if reporter is not None else 0


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, config: pytest.Config
) -> None:
    skipped = _skipped(config)
    if skipped:
        terminalreporter.write_sep(
            "=",
            f"{skipped} skipped, and {FAIL_ON_SKIP_ENV}=1 makes a skip fail the run",
            red=True,
        )


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if session.exitstatus == pytest.ExitCode.OK and _skipped(session.config):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


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
