"""The web UI in a real headless browser (Debian's chromium driven by Playwright) against the real
stack: the API key prompt, a streamed chat stopped half way, side by side, and an arena round whose
vote reaches the leaderboard. Screenshots go to tests/artifacts/webui/."""

from __future__ import annotations

import asyncio
import json
import os
import re
from collections.abc import Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from chatfleet.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from services.cli.launcher import ServiceProcess, free_port
from services.common.backoff import Backoff
from services.common.grpc_server import insecure_channel
from tests.integration.conftest import CHAT_MODEL, HOST, READY_TIMEOUT_S, Stack, service_env

pytestmark = pytest.mark.integration

CHROMIUM = os.environ.get("CHATFLEET_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts" / "webui"
KEY = "sk-e2e-webui"
# Generous: the model answers on a shared 2-core CPU.
ANSWER_TIMEOUT_MS = 120_000
STORY_PROMPT = "Write a long story about a lighthouse keeper."

T = TypeVar("T")


def run_async(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to the end in a thread of its own: Playwright's sync API keeps an event
    loop running in the test's thread, where asyncio.run refuses to start."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


@pytest.fixture(scope="module")
def gateway_url(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A gateway of its own in front of the session's stack: it requires an API key and keeps
    arena votes in a fresh file, so the leaderboard starts empty."""
    folder = tmp_path_factory.mktemp("webui")
    port = free_port()
    gateway = ServiceProcess(
        "gateway",
        [
            "--host", HOST, "--port", str(port), "--controller-address", stack.controller_address,
            "--api-keys", KEY, "--arena-db", str(folder / "arena.sqlite3"),
        ],
        service_env(),
        str(folder / "gateway.log"),
    )  # fmt: skip
    url = f"http://{HOST}:{port}"
    gateway.start()
    try:
        run_async(gateway.wait_http_ok(f"{url}/health", READY_TIMEOUT_S))
        yield url
    except BaseException:
        print((folder / "gateway.log").read_text()[-4000:])
        raise
    finally:
        run_async(gateway.stop())


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no chromium at {CHROMIUM}: run `make chromium`")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True
        )
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def page(gateway_url: str, browser: Browser) -> Iterator[Page]:
    context = browser.new_context(base_url=gateway_url, viewport={"width": 1280, "height": 800})
    opened = context.new_page()
    errors: list[str] = []
    opened.on("pageerror", lambda error: errors.append(str(error)))
    try:
        yield opened
    finally:
        context.close()
    assert errors == [], f"JavaScript errors on the page: {errors}"


def with_key(page: Page) -> Page:
    """Open the page with the API key already in the tab's session storage."""
    page.add_init_script(f"sessionStorage.setItem('chatfleet.apiKey', {KEY!r})")
    page.goto("/")
    expect(page.locator("#chat-model")).to_have_value(CHAT_MODEL)
    return page


def shot(page: Page, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"))


def worker_load(address: str) -> common_pb2.Load:
    async def ask() -> common_pb2.Load:
        async with insecure_channel(address) as channel:
            stub = worker_pb2_grpc.WorkerServiceStub(channel)
            reply = await stub.GetLoad(worker_pb2.GetLoadRequest(), timeout=10)
            return reply.load

    return run_async(ask())


def wait_idle(page: Page, address: str, timeout_s: float = 30.0) -> common_pb2.Load:
    """The worker's load once nothing runs or waits (asked again with a growing pause: the worker
    has no way to announce it)."""
    backoff, waited_s = Backoff(first=0.05, cap=1.0), 0.0
    while True:
        load = worker_load(address)
        if (load.running, load.waiting) == (0, 0) or waited_s > timeout_s:
            return load
        delay_s = backoff.step()
        page.wait_for_timeout(delay_s * 1000)
        waited_s += delay_s


def answer_text(page: Page, container: str) -> str:
    return str(page.locator(f"{container} .message.assistant .body").last.inner_text())


def test_the_page_asks_for_a_key_then_lists_the_models(page: Page) -> None:
    page.goto("/")
    dialog = page.locator("#key-dialog")
    expect(dialog).to_be_visible()
    expect(page.locator("#server-status")).to_have_text("An API key is needed.")
    shot(page, "01-api-key")
    page.fill("#key-input", "wrong-key")
    page.click("#key-save")
    expect(page.locator("#key-error")).to_have_text("That key was refused.")
    page.fill("#key-input", KEY)
    page.click("#key-save")
    expect(dialog).to_be_hidden()
    # Only chat models are offered: the embedding model is left out.
    expect(page.locator("#chat-model option")).to_have_text([CHAT_MODEL])
    expect(page.locator("#server-status")).to_have_text("1 chat model served.")


def test_chat_streams_renders_markdown_and_stops(page: Page, stack: Stack) -> None:
    with_key(page)
    # Greedy decoding: the same long answer every run (a sampled one might end early). This prompt
    # runs to the 1500-token limit in every --quantization mode (checked on none, bf16, int8, int4),
    # so the answer is still streaming when Stop is pressed.
    page.locator("#temperature").fill("0")
    page.fill("#max-tokens", "1500")
    page.fill("#prompt", STORY_PROMPT)
    page.press("#prompt", "Enter")
    chat = "#chat-messages"
    expect(page.locator(f"{chat} .message.user")).to_have_text(STORY_PROMPT)
    streaming = page.locator(f"{chat} .message.assistant.streaming")
    expect(streaming).to_have_count(1)
    expect(page.locator("#stop")).to_be_visible()

    # The answer grows while we watch: tokens stream in, they are not delivered at the end.
    longer_than = (
        "n => document.querySelector('#chat-messages .message.assistant .body')"
        ".innerText.length > n"
    )
    page.wait_for_function(longer_than, arg=0, timeout=ANSWER_TIMEOUT_MS)
    first = answer_text(page, chat)
    page.wait_for_function(longer_than, arg=max(len(first), 40), timeout=ANSWER_TIMEOUT_MS)
    second = answer_text(page, chat)
    assert len(second) > len(first)
    assert worker_load(stack.worker_address).running >= 1
    shot(page, "02-chat-streaming")

    page.click("#stop")
    stopped = page.locator(f"{chat} .message.assistant")
    expect(stopped).to_have_attribute("data-outcome", "stopped")
    expect(stopped.locator(".meta")).to_contain_text("stopped")
    expect(page.locator("#send")).to_be_visible()
    # Markdown was rendered (paragraphs or a list), never shown as raw HTML.
    assert stopped.locator(".body p, .body li, .body pre").count() >= 1
    # Aborting the fetch made the gateway cancel the gRPC call: the worker's slot is free again
    # long before 1500 tokens could have been generated.
    load = wait_idle(page, stack.worker_address)
    assert (load.running, load.waiting) == (0, 0)
    shot(page, "03-chat-stopped")

    # Regenerate replaces the answer; copy and clear work.
    page.fill("#max-tokens", "24")
    page.click("#chat-regenerate")
    answers = page.locator(f"{chat} .message.assistant")
    expect(answers).to_have_count(1)
    expect(answers).to_have_attribute(
        "data-outcome", re.compile("done|length"), timeout=ANSWER_TIMEOUT_MS
    )
    expect(answers.locator(".meta button", has_text="Copy")).to_be_visible()
    page.click("#chat-clear")
    expect(page.locator(f"{chat} .message")).to_have_count(0)


MARKDOWN_REPLY = (
    "Here is **bold** text and a list:\n\n- one\n- two\n\n"
    "```python\nprint('hi')\n```\n\n"
    '<img src="x" onerror="window.pwned = 1"> <script>window.pwned = 2</script>'
    "[a link](javascript:window.pwned=3)"
)


def test_markdown_renders_code_blocks_and_never_runs_html(page: Page) -> None:
    # The gateway's reply is replaced by a scripted stream, so the rendering is deterministic.
    chunks = [MARKDOWN_REPLY[i : i + 16] for i in range(0, len(MARKDOWN_REPLY), 16)]
    events = [
        {"choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]}
        for piece in chunks
    ]
    body = "".join(f"data: {json.dumps(event)}\n\n" for event in events) + "data: [DONE]\n\n"
    page.route(
        "**/v1/chat/completions",
        lambda route: route.fulfill(
            status=200, headers={"Content-Type": "text/event-stream"}, body=body
        ),
    )
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    with_key(page)
    page.fill("#prompt", "Show me some Markdown.")
    page.press("#prompt", "Enter")
    answer = page.locator("#chat-messages .message.assistant")
    expect(answer).to_have_attribute("data-outcome", "done")
    expect(answer.locator(".body strong")).to_have_text("bold")
    expect(answer.locator(".body li")).to_have_text(["one", "two"])
    expect(answer.locator(".body pre code")).to_have_text("print('hi')")
    assert answer.locator(".body script").count() == 0
    assert answer.locator(".body img, .body [onerror]").count() == 0
    assert answer.locator(".body a[href^='javascript']").count() == 0
    assert page.evaluate("window.pwned") is None
    copy = answer.locator(".body pre .copy-code")
    copy.click()
    expect(copy).to_have_text("Copied")
    assert page.evaluate("navigator.clipboard.readText()") == "print('hi')"
    shot(page, "08-markdown")


def test_side_by_side_streams_both_columns(page: Page) -> None:
    with_key(page)
    page.click("button[data-tab='side']")
    page.locator("#temperature").fill("0")  # greedy: never an empty answer
    page.fill("#max-tokens", "24")
    page.fill("#prompt", "What is the capital of France?")
    page.click("#send")
    for column in ("#side-messages-a", "#side-messages-b"):
        answer = page.locator(f"{column} .message.assistant")
        expect(answer).to_have_attribute(
            "data-outcome", re.compile("done|length"), timeout=ANSWER_TIMEOUT_MS
        )
        assert answer_text(page, column)
    shot(page, "04-side-by-side")


def test_arena_round_vote_and_leaderboard(page: Page) -> None:
    with_key(page)
    page.click("button[data-tab='arena']")
    expect(page.locator("#arena-name-a")).to_have_text("Model A")
    page.fill("#max-tokens", "32")
    page.fill("#prompt", "What is the capital of France?")
    page.click("#send")
    # The stack serves one chat model: it faces itself, and the page says so.
    expect(page.locator("#arena-notice")).to_contain_text("faces itself")
    for column in ("#arena-messages-a", "#arena-messages-b"):
        expect(page.locator(f"{column} .message.assistant")).to_have_attribute(
            "data-outcome", re.compile("done|length"), timeout=ANSWER_TIMEOUT_MS
        )
    # Names stay hidden until the vote.
    expect(page.locator("#arena-name-a")).to_have_text("Model A")
    assert CHAT_MODEL not in page.locator("#panel-arena").inner_text()
    shot(page, "05-arena-answers")

    vote = page.locator("#arena-votes button[data-winner='a']")
    expect(vote).to_be_enabled()
    vote.click()
    expect(page.locator("#arena-name-a")).to_have_text(CHAT_MODEL)
    expect(page.locator("#arena-name-b")).to_have_text(CHAT_MODEL)
    expect(page.locator("#arena-votes button").first).to_be_disabled()
    shot(page, "06-arena-voted")

    page.click("button[data-tab='leaderboard']")
    rows = page.locator("#leaderboard-rows tr")
    expect(rows).to_have_count(1)
    # Rank, model, Bradley-Terry rating, its 95% interval, votes, wins, ties, losses, MT-bench.
    expect(rows.locator("td")).to_have_text(
        ["1", CHAT_MODEL, "1000", "+0/-0", "1", "0", "0", "0", "—"]
    )
    expect(page.locator("#leaderboard-summary")).to_contain_text("1 vote")
    shot(page, "07-leaderboard")
