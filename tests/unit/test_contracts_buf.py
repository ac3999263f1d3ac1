"""buf guards the contracts: lint STANDARD is clean, and `buf breaking` (FILE rules, as `make lint`
runs it) rejects changes that break chatfleet.v1 while accepting additive ones."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
WORKER_PROTO = Path("protos/chatfleet/v1/worker.proto")
CONTROLLER_PROTO = Path("protos/chatfleet/v1/controller.proto")
COMMON_PROTO = Path("protos/chatfleet/v1/common.proto")


@pytest.fixture(scope="module")
def buf() -> str:
    """The pinned buf from .tools/, installed through the Makefile like `make lint` does."""
    if shutil.which("npm") is None or shutil.which("make") is None:
        pytest.skip("buf comes from the npm package @bufbuild/buf: this machine has no npm or make")
    done = subprocess.run(
        ["make", "--no-print-directory", "buf"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return str(ROOT / ".tools" / "bin" / "buf")


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    """A copy of the repo's buf workspace (buf.yaml + protos/) that a test may edit."""
    shutil.copy(ROOT / "buf.yaml", tmp_path / "buf.yaml")
    shutil.copytree(ROOT / "protos", tmp_path / "protos")
    return tmp_path


def run_buf(buf: str, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [buf, *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


def breaking(buf: str, workspace: Path) -> subprocess.CompletedProcess[str]:
    # The same command as the Makefile's buf-check, with the repo's protos as the baseline.
    return run_buf(buf, workspace, "breaking", "protos", "--against", str(ROOT / "protos"))


def edit(workspace: Path, proto: Path, old: str, new: str) -> None:
    path = workspace / proto
    text = path.read_text()
    assert text.count(old) == 1, f"{old!r} not found exactly once in {proto}"
    path.write_text(text.replace(old, new))


def test_lint_standard_has_no_findings(buf: str) -> None:
    done = run_buf(buf, ROOT, "lint")
    assert done.returncode == 0 and done.stdout == "", done.stdout + done.stderr


def test_unchanged_protos_pass(buf: str, workspace: Path) -> None:
    done = breaking(buf, workspace)
    assert done.returncode == 0, done.stdout + done.stderr


# Each breaking edit and a phrase buf's report must contain (naming what broke).
BREAKING_EDITS: dict[str, tuple[Path, str, str, str]] = {
    "delete a field": (
        WORKER_PROTO,
        "  StoppingCriteria stopping = 7;\n",
        "",
        'field "7" with name "stopping" on message "GenerateRequest" was deleted',
    ),
    "delete a field, reserving its number": (
        WORKER_PROTO,
        "  StoppingCriteria stopping = 7;\n",
        "  reserved 7;\n",
        'field "7" with name "stopping" on message "GenerateRequest" was deleted',
    ),
    "renumber a field": (
        CONTROLLER_PROTO,
        "  repeated string exclude_addresses = 3;",
        "  repeated string exclude_addresses = 4;",
        'field "3" with name "exclude_addresses" on message "SelectWorkerRequest" was deleted',
    ),
    "rename a field": (
        COMMON_PROTO,
        "  uint32 capacity = 3;",
        "  uint32 max_running = 3;",
        'Field "3" on message "Load" changed name from "capacity" to "max_running"',
    ),
    "change a field's type": (
        WORKER_PROTO,
        "  optional uint32 max_tokens = 1;",
        "  optional uint64 max_tokens = 1;",
        'Field "1" with name "max_tokens" on message "StoppingCriteria" changed type',
    ),
    "delete an RPC": (
        CONTROLLER_PROTO,
        "  rpc ListWorkers(ListWorkersRequest) returns (ListWorkersResponse);\n",
        "",
        'RPC "ListWorkers" on service "ControllerService" was deleted',
    ),
    "make a response unary": (
        WORKER_PROTO,
        "returns (stream GenerateResponse);",
        "returns (GenerateResponse);",
        'RPC "Generate" on service "WorkerService" changed from server streaming to server unary',
    ),
    "delete an enum value": (
        WORKER_PROTO,
        "  FINISH_REASON_CANCELLED = 3;\n",
        "",
        'enum value "3" on enum "FinishReason" was deleted',
    ),
}


@pytest.mark.parametrize("change", list(BREAKING_EDITS))
def test_breaking_change_fails_naming_what_broke(buf: str, workspace: Path, change: str) -> None:
    proto, old, new, reported = BREAKING_EDITS[change]
    edit(workspace, proto, old, new)
    done = breaking(buf, workspace)
    assert done.returncode != 0, f"buf breaking accepted: {change}"
    assert reported in done.stdout, done.stdout + done.stderr
    assert str(proto) in done.stdout  # the report points at the file


def _add_field(workspace: Path) -> None:
    edit(
        workspace,
        WORKER_PROTO,
        "  ToolChoice tool_choice = 11;\n",
        "  ToolChoice tool_choice = 11;\n  // A caller-chosen end-user id.\n  string user = 12;\n",
    )


def _add_rpc_and_messages(workspace: Path) -> None:
    edit(
        workspace,
        CONTROLLER_PROTO,
        "  rpc SelectWorker(SelectWorkerRequest) returns (SelectWorkerResponse);\n",
        "  rpc SelectWorker(SelectWorkerRequest) returns (SelectWorkerResponse);\n"
        "  // GetWorker returns one registered worker.\n"
        "  rpc GetWorker(GetWorkerRequest) returns (GetWorkerResponse);\n",
    )
    path = workspace / CONTROLLER_PROTO
    path.write_text(
        path.read_text()
        + "\n// GetWorkerRequest names a worker.\nmessage GetWorkerRequest {\n"
        + "  // host:port of the worker.\n  string address = 1;\n}\n"
        + "\n// GetWorkerResponse describes it.\nmessage GetWorkerResponse {\n"
        + "  // The worker.\n  WorkerStatus worker = 1;\n}\n"
    )


def _add_enum_value(workspace: Path) -> None:
    edit(
        workspace,
        WORKER_PROTO,
        "  FINISH_REASON_TOOL_CALLS = 4;\n",
        "  FINISH_REASON_TOOL_CALLS = 4;\n  // A content filter ended generation.\n"
        "  FINISH_REASON_CONTENT_FILTER = 5;\n",
    )


def _add_file(workspace: Path) -> None:
    (workspace / "protos/chatfleet/v1/admin.proto").write_text(
        'syntax = "proto3";\n\npackage chatfleet.v1;\n\n'
        "// AdminService is an additive new service.\nservice AdminService {\n"
        "  // Ping answers.\n  rpc Ping(PingRequest) returns (PingResponse);\n}\n\n"
        "// PingRequest asks.\nmessage PingRequest {}\n\n// PingResponse answers.\n"
        "message PingResponse {}\n"
    )


ADDITIVE_EDITS: dict[str, Callable[[Path], None]] = {
    "add a field": _add_field,
    "add an RPC and its messages": _add_rpc_and_messages,
    "add an enum value": _add_enum_value,
    "add a service in a new file": _add_file,
}


@pytest.mark.parametrize("change", list(ADDITIVE_EDITS))
def test_additive_change_passes_breaking_and_lint(buf: str, workspace: Path, change: str) -> None:
    ADDITIVE_EDITS[change](workspace)
    done = breaking(buf, workspace)
    assert done.returncode == 0, done.stdout + done.stderr
    linted = run_buf(buf, workspace, "lint")
    assert linted.returncode == 0, linted.stdout + linted.stderr


@pytest.fixture
def clone(tmp_path: Path, buf: str) -> Path:
    """A fresh clone carrying this checkout's contract files, sharing the installed buf."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs git and a git checkout")
    clone = tmp_path / "clone"
    git = ["git", "-c", "advice.detachedHead=false"]
    subprocess.run([*git, "clone", "-q", str(ROOT), str(clone)], check=True, timeout=120)
    # Uncommitted work counts: the clone gets this checkout's Makefile, buf.yaml and protos.
    for name in ("Makefile", "buf.yaml"):
        shutil.copy(ROOT / name, clone / name)
    shutil.rmtree(clone / "protos")
    shutil.copytree(ROOT / "protos", clone / "protos")
    (clone / ".tools").mkdir()
    installed = Path(buf).resolve().parents[3]  # .tools/buf-<version>
    (clone / ".tools" / installed.name).symlink_to(installed)
    return clone


def make_buf_check(clone: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["make", "--no-print-directory", "buf-check"],
        cwd=clone,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_make_buf_check_in_a_fresh_clone_compares_with_main(clone: Path) -> None:
    done = make_buf_check(clone)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "--against main:protos" in done.stdout
    edit(
        clone,
        CONTROLLER_PROTO,
        "  string model = 1;\n  // How to choose",
        "  string model = 4;\n  // How to choose",
    )
    done = make_buf_check(clone)
    assert done.returncode != 0
    assert 'field "1" with name "model" on message "SelectWorkerRequest"' in done.stdout


def test_make_buf_check_on_a_branch_without_local_main_uses_origin_main(clone: Path) -> None:
    subprocess.run(["git", "-C", str(clone), "branch", "-q", "-m", "main", "feature"], check=True)
    edit(clone, WORKER_PROTO, "  bool echo = 9;\n", "")
    done = make_buf_check(clone)
    assert "--against origin/main:protos" in done.stdout
    assert done.returncode != 0
    assert 'with name "echo" on message "GenerateRequest" was deleted' in done.stdout


def test_make_buf_check_outside_git_lints_and_says_why_it_skips_breaking(clone: Path) -> None:
    shutil.rmtree(clone / ".git")
    done = make_buf_check(clone)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "not a git clone, nothing to compare with" in done.stdout
