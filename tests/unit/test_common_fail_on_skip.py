"""`make test`'s rule (tests/conftest.py): with CHATFLEET_FAIL_ON_SKIP=1 a run that skips a test
fails and says why; without it, as when a developer runs one file, a skip is only reported."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import FAIL_ON_SKIP_ENV

REPO = Path(__file__).resolve().parents[2]

SAMPLE = """
import pytest

def test_runs():
    pass

@pytest.mark.skip(reason="the tool is missing")
def test_skipped():
    pass

@pytest.mark.xfail(reason="a known bug", strict=True)
def test_known_bug():
    assert False
"""


def run_sample(
    tmp_path: Path, source: str, fail_on_skip: str | None
) -> subprocess.CompletedProcess[str]:
    """pytest on `source` and a module with one passing test, outside this suite's configuration
    but with its conftest's hooks."""
    (tmp_path / "test_sample.py").write_text(source)
    (tmp_path / "test_other.py").write_text("def test_passes():\n    pass\n")
    env = {key: value for key, value in os.environ.items() if key != FAIL_ON_SKIP_ENV}
    if fail_on_skip is not None:
        env[FAIL_ON_SKIP_ENV] = fail_on_skip
    command = [
        sys.executable, "-m", "pytest", "-q", "-ra", "-p", "tests.conftest",
        "-c", os.devnull, "--rootdir", str(tmp_path), "-p", "no:cacheprovider", str(tmp_path),
    ]  # fmt: skip
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def test_a_skip_fails_the_run_and_is_explained(tmp_path: Path) -> None:
    run = run_sample(tmp_path, SAMPLE, "1")
    assert run.returncode == pytest.ExitCode.TESTS_FAILED, run.stdout + run.stderr
    assert "SKIPPED [1] " in run.stdout and "the tool is missing" in run.stdout
    assert f"1 skipped, and {FAIL_ON_SKIP_ENV}=1 makes a skip fail the run" in run.stdout


def test_without_the_setting_a_skip_is_only_reported(tmp_path: Path) -> None:
    run = run_sample(tmp_path, SAMPLE, None)
    assert run.returncode == pytest.ExitCode.OK, run.stdout + run.stderr
    assert "the tool is missing" in run.stdout
    assert "makes a skip fail the run" not in run.stdout


def test_expected_failures_are_not_skips(tmp_path: Path) -> None:
    run = run_sample(
        tmp_path, SAMPLE.replace('@pytest.mark.skip(reason="the tool is missing")\n', ""), "1"
    )
    assert run.returncode == pytest.ExitCode.OK, run.stdout + run.stderr
    assert "1 xfailed" in run.stdout


def test_a_skipped_module_counts_too(tmp_path: Path) -> None:
    source = 'import pytest\npytest.skip("no openssl", allow_module_level=True)\n'
    run = run_sample(tmp_path, source, "1")
    assert run.returncode == pytest.ExitCode.TESTS_FAILED, run.stdout + run.stderr
    assert "no openssl" in run.stdout
