"""`chatfleet chat` driven in a pseudo terminal against the gateway on a free port, backed by the
fake controller and worker: streaming, FastChat's `!!` commands, multiline input, clear
errors."""

from __future__ import annotations

import asyncio
import json
import subprocess
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from chatfleet.v1 import worker_pb2
from services.cli.chat import Conversation, ConversationFileError
from services.cli.launcher import free_port
from services.common.errors import InvalidRequestError
from tests.unit.gateway_fakes import (
    CHAT_MODEL,
    Fleet,
    failing_script,
    fake_fleet,
    gateway_server,
    hanging_script,
)
from tests.unit.pty_driver import PtySession, chatfleet

KEY = "sk-chat-test"


@dataclass
class Gateway:
    url: str
    fleet: Fleet

    def sent_messages(self) -> list[tuple[str, str]]:
        """(role, content) of the conversation in the last chat request the worker got."""
        request = self.fleet.worker.generate_requests[-1]
        return [(m.role, m.content) for m in request.chat.messages]


async def numbered_replies(
    request: worker_pb2.GenerateRequest, counter: Iterator[int]
) -> AsyncIterator[worker_pb2.GenerateResponse]:
    """'Reply N to <last message>' in four pieces, with usage on the last one."""
    number = next(counter)
    last = request.chat.messages[-1].content.replace("\n", " / ")
    pieces = ["Reply", f" {number}", " to", f" {last}"]
    for i, piece in enumerate(pieces):
        response = worker_pb2.GenerateResponse(text=piece, token_ids=[i])
        if i == len(pieces) - 1:
            response.finish_reason = worker_pb2.FINISH_REASON_STOP
            response.usage.prompt_tokens = 5
            response.usage.completion_tokens = len(pieces)
        yield response


def _serve_in_thread(api_keys: tuple[str, ...] = ()) -> Iterator[Gateway]:
    """The fake fleet and a real gateway server on their own event loop, while the test (like a
    person) types into the chat's terminal from this thread."""
    ready = threading.Event()
    found: list[Gateway] = []
    holder: dict[str, object] = {}

    async def serve() -> None:
        stop = asyncio.Event()
        holder["stop"], holder["loop"] = stop, asyncio.get_running_loop()
        async with fake_fleet(api_keys=api_keys) as fleet, gateway_server(fleet.config) as url:
            counter = iter(range(1, 1000))
            fleet.worker.script = lambda request: numbered_replies(request, counter)
            found.append(Gateway(url, fleet))
            ready.set()
            await stop.wait()

    thread = threading.Thread(target=asyncio.run, args=(serve(),), daemon=True)
    thread.start()
    try:
        assert ready.wait(30), "the fake gateway did not start"
        yield found[0]
    finally:
        loop = holder.get("loop")
        if isinstance(loop, asyncio.AbstractEventLoop):
            stop = holder["stop"]
            assert isinstance(stop, asyncio.Event)
            loop.call_soon_threadsafe(stop.set)
        thread.join(30)


@pytest.fixture
def gateway() -> Iterator[Gateway]:
    yield from _serve_in_thread()


@pytest.fixture
def chat_session(gateway: Gateway) -> Iterator[PtySession]:
    session = PtySession(
        chatfleet("chat", "--url", gateway.url, "--model", CHAT_MODEL, "--style", "simple")
    )
    try:
        yield session
    finally:
        session.close()


def say(session: PtySession, text: str, number: int) -> None:
    session.expect(r"USER: ")
    session.sendline(text)
    session.expect(rf"ASSISTANT: Reply {number} to {text}")


def exit_chat(session: PtySession) -> None:
    session.expect(r"USER: ")
    session.sendline("!!exit")
    session.expect(r"exit\.\.\.")
    assert session.wait() == 0


def test_streams_a_reply_and_exits(gateway: Gateway, chat_session: PtySession) -> None:
    say(chat_session, "hello", 1)
    say(chat_session, "and again", 2)
    assert gateway.sent_messages() == [
        ("user", "hello"),
        ("assistant", "Reply 1 to hello"),
        ("user", "and again"),
    ]
    exit_chat(chat_session)


def test_rich_style_renders_markdown_and_debug_shows_speed(gateway: Gateway) -> None:
    session = PtySession(chatfleet("chat", "--url", gateway.url, "--model", CHAT_MODEL, "--debug"))
    try:
        session.expect(rf"chatfleet chat with {CHAT_MODEL}")
        session.expect(r"USER: ")
        session.sendline("hi there")
        session.expect(r"ASSISTANT:")
        session.expect(r"Reply 1 to hi there")
        session.expect(r"\[debug\] 4 tokens in [\d.]+ s: [\d.]+ tokens/s \(first token after")
        exit_chat(session)
    finally:
        session.close()


def test_reset_starts_a_new_conversation(gateway: Gateway, chat_session: PtySession) -> None:
    say(chat_session, "one", 1)
    chat_session.expect(r"USER: ")
    chat_session.sendline("!!reset")
    chat_session.expect(r"resetting\.\.\.")
    say(chat_session, "two", 2)
    assert gateway.sent_messages() == [("user", "two")]
    exit_chat(chat_session)


def test_remove_drops_the_last_exchange(gateway: Gateway, chat_session: PtySession) -> None:
    say(chat_session, "one", 1)
    say(chat_session, "two", 2)
    chat_session.expect(r"USER: ")
    chat_session.sendline("!!remove")
    chat_session.expect(r"removed the last exchange")
    say(chat_session, "three", 3)
    assert gateway.sent_messages() == [
        ("user", "one"),
        ("assistant", "Reply 1 to one"),
        ("user", "three"),
    ]
    exit_chat(chat_session)


def test_regen_asks_again_for_the_last_reply(gateway: Gateway, chat_session: PtySession) -> None:
    say(chat_session, "one", 1)
    say(chat_session, "two", 2)
    chat_session.expect(r"USER: ")
    chat_session.sendline("!!regen")
    chat_session.expect(r"regenerating the last reply\.\.\.")
    chat_session.expect(r"ASSISTANT: Reply 3 to two")
    # The old reply and its question are replaced, not repeated.
    assert gateway.sent_messages() == [
        ("user", "one"),
        ("assistant", "Reply 1 to one"),
        ("user", "two"),
    ]
    say(chat_session, "three", 4)
    assert gateway.sent_messages()[-2:] == [("assistant", "Reply 3 to two"), ("user", "three")]
    exit_chat(chat_session)


def test_remove_and_regen_on_an_empty_conversation(chat_session: PtySession) -> None:
    chat_session.expect(r"USER: ")
    chat_session.sendline("!!remove")
    chat_session.expect(r"no messages to remove")
    chat_session.expect(r"USER: ")
    chat_session.sendline("!!regen")
    chat_session.expect(r"no message to regenerate a reply for")
    exit_chat(chat_session)


def test_save_and_load_round_trip(
    gateway: Gateway, chat_session: PtySession, tmp_path: Path
) -> None:
    path = tmp_path / "conversation.json"
    say(chat_session, "one", 1)
    say(chat_session, "two", 2)
    chat_session.expect(r"USER: ")
    chat_session.sendline(f"!!save {tmp_path / 'conversation'}")  # .json is added
    chat_session.expect(r"saved the conversation to .*conversation\.json")
    saved = json.loads(path.read_text())
    assert saved["model"] == CHAT_MODEL
    assert saved["messages"] == [
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "Reply 1 to one"},
        {"role": "user", "content": "two"},
        {"role": "assistant", "content": "Reply 2 to two"},
    ]
    chat_session.expect(r"USER: ")
    chat_session.sendline("!!reset")
    chat_session.expect(r"USER: ")
    chat_session.sendline(f"!!load {path}")
    chat_session.expect(r"loaded 4 messages from")
    chat_session.expect(r"ASSISTANT: Reply 2 to two")
    say(chat_session, "three", 3)
    assert gateway.sent_messages() == [
        ("user", "one"),
        ("assistant", "Reply 1 to one"),
        ("user", "two"),
        ("assistant", "Reply 2 to two"),
        ("user", "three"),
    ]
    exit_chat(chat_session)


def test_load_reports_bad_files(chat_session: PtySession, tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text('{"messages": [{"role": "robot", "content": "x"}]}')
    chat_session.expect(r"USER: ")
    chat_session.sendline(f"!!load {tmp_path / 'missing.json'}")
    chat_session.expect(r"error: cannot read .*missing\.json")
    chat_session.expect(r"USER: ")
    chat_session.sendline(f"!!load {tmp_path / 'bad'}")  # .json is tried too
    chat_session.expect(r"is not a conversation file: not a chat message")
    chat_session.expect(r"USER: ")
    chat_session.sendline("!!save")
    chat_session.expect(r"usage: !!save FILE")
    exit_chat(chat_session)


def test_multiline_message_ends_with_ctrl_d(gateway: Gateway) -> None:
    session = PtySession(
        chatfleet(
            "chat", "--url", gateway.url, "--model", CHAT_MODEL, "--style", "simple",
            "--multiline",
        )
    )  # fmt: skip
    try:
        session.expect(r"USER \[Ctrl-D on an empty line to send\]: ")
        session.sendline("first line")
        session.sendline("second line")
        session.send_eof()
        session.expect(r"ASSISTANT: Reply 1 to first line / second line")
        assert gateway.sent_messages() == [("user", "first line\nsecond line")]
        # The terminal still reads after Ctrl-D: a second multiline message works too.
        session.expect(r"USER \[Ctrl-D on an empty line to send\]: ")
        session.sendline("third")
        session.send_eof()
        session.expect(r"ASSISTANT: Reply 2 to third")
        session.expect(r"USER \[Ctrl-D")
        session.send_eof()  # an empty message quits, as in FastChat
        session.expect(r"exit\.\.\.")
        assert session.wait() == 0
    finally:
        session.close()


def test_empty_line_and_eof_exit(chat_session: PtySession) -> None:
    chat_session.expect(r"USER: ")
    chat_session.sendline("")
    chat_session.expect(r"exit\.\.\.")
    assert chat_session.wait() == 0


def test_gateway_down_is_a_clear_error() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    session = PtySession(chatfleet("chat", "--url", url, "--style", "simple"))
    try:
        session.expect(rf"error: cannot reach the gateway at {url}: is it running\?")
        assert session.wait() == 1
        assert "Traceback" not in session.output
    finally:
        session.close()


def test_unknown_model_lists_the_served_ones(gateway: Gateway) -> None:
    session = PtySession(chatfleet("chat", "--url", gateway.url, "--model", "nope"))
    try:
        session.expect(rf"unknown model 'nope': the gateway serves .*{CHAT_MODEL}")
        assert session.wait() == 1
        assert "Traceback" not in session.output
    finally:
        session.close()


@pytest.fixture
def keyed_gateway() -> Iterator[Gateway]:
    yield from _serve_in_thread(api_keys=(KEY,))


def test_api_key_missing_wrong_and_right(keyed_gateway: Gateway) -> None:
    base = ["chat", "--url", keyed_gateway.url, "--model", CHAT_MODEL, "--style", "simple"]
    session = PtySession(chatfleet(*base))
    try:
        session.expect(r"error: the gateway requires an API key: pass --api-key KEY")
        assert session.wait() == 1
    finally:
        session.close()
    session = PtySession(chatfleet(*base, "--api-key", "wrong"))
    try:
        session.expect(r"error: the gateway refused the API key given with --api-key")
        assert session.wait() == 1
    finally:
        session.close()
    session = PtySession(chatfleet(*base, "--api-key", KEY))
    try:
        say(session, "hello", 1)
        exit_chat(session)
        assert "Traceback" not in session.output
    finally:
        session.close()


def test_error_during_a_chat_keeps_the_session(gateway: Gateway, chat_session: PtySession) -> None:
    say(chat_session, "one", 1)
    numbered = gateway.fleet.worker.script
    gateway.fleet.worker.script = failing_script(
        InvalidRequestError("the prompt is too long", param="messages")
    )
    chat_session.expect(r"USER: ")
    chat_session.sendline("two")
    chat_session.expect(r"error: the prompt is too long \(HTTP 400\)")
    gateway.fleet.worker.script = numbered
    say(chat_session, "three", 2)
    # The failed message was not kept.
    assert gateway.sent_messages() == [
        ("user", "one"),
        ("assistant", "Reply 1 to one"),
        ("user", "three"),
    ]
    exit_chat(chat_session)


def test_ctrl_c_stops_a_reply_and_keeps_the_session(
    gateway: Gateway, chat_session: PtySession
) -> None:
    gateway.fleet.worker.script = hanging_script(after=2)
    chat_session.expect(r"USER: ")
    chat_session.sendline("tell me everything")
    chat_session.expect(r"ASSISTANT: Hello from")
    chat_session.send_interrupt()
    chat_session.expect(r"\(stopped\)")
    chat_session.expect(r"USER: ")
    chat_session.sendline("!!remove")  # the partial reply was kept, as an exchange
    chat_session.expect(r"removed the last exchange")
    exit_chat(chat_session)
    # Closing the stream cancelled generation on the worker.
    assert gateway.fleet.worker.generate_cancelled.is_set()


def test_conversation_loads_fastchat_files() -> None:
    fastchat = {
        "template_name": "vicuna_v1.1",
        "system_message": "Be brief.",
        "roles": ["USER", "ASSISTANT"],
        "messages": [["USER", "Hi"], ["ASSISTANT", "Hello!"], ["USER", "Bye"]],
        "offset": 0,
    }
    conversation = Conversation.from_json(fastchat)
    assert conversation.request_messages() == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
    ]
    ours = Conversation.from_json(conversation.to_json("m"))
    assert ours == conversation
    with pytest.raises(ConversationFileError):
        Conversation.from_json([1, 2])


def test_error_in_the_middle_of_a_reply(gateway: Gateway, chat_session: PtySession) -> None:
    gateway.fleet.worker.script = failing_script(
        InvalidRequestError("the worker gave up", param="messages"), after=2
    )
    chat_session.expect(r"USER: ")
    chat_session.sendline("one")
    chat_session.expect(r"ASSISTANT: Hello from")
    chat_session.expect(r"error: the worker gave up")
    chat_session.expect(r"USER: ")
    chat_session.sendline("!!remove")  # the failed exchange was not kept
    chat_session.expect(r"no messages to remove")
    exit_chat(chat_session)


def test_simple_style_in_a_pipe(gateway: Gateway) -> None:
    """Piped in and out: plain text, no terminal escapes; the end of the input ends the chat."""
    done = subprocess.run(
        chatfleet("chat", "--url", gateway.url, "--model", CHAT_MODEL, "--style", "simple"),
        input="hello\nagain\n",
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == (
        "USER: ASSISTANT: Reply 1 to hello\nUSER: ASSISTANT: Reply 2 to again\nUSER: exit...\n"
    )
