"""`chatfleet chat`: FastChat's terminal chat (same `!!` commands), streaming replies from the
gateway's OpenAI API and rendering them as Markdown as they arrive.

Commands: `!!exit` (or an empty message, or Ctrl-D) quits, `!!reset` starts over, `!!remove` drops
the last exchange, `!!regen` asks for the last reply again, `!!save FILE` / `!!load FILE` write and
read the conversation as JSON (an OpenAI request's `messages`; FastChat's saved files load too).
With --multiline, as in FastChat's simple chat, a message ends with Ctrl-D on an empty line.

The loop is synchronous on purpose: `input()` owns the terminal. Each reply streams in an event
loop of its own, whose SIGINT handler cancels it: Ctrl-C during a reply stops only that reply
(closing the stream cancels generation on the server). A KeyboardInterrupt would not do: a Ctrl-C
that lands just before a blocking socket read is only noticed when the read returns, which a
stalled reply never does; the loop's handler writes to a wakeup fd that its selector watches.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.live import Live
from rich.markdown import Markdown
from rich.markup import escape

from services.cli.main import new_parser

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
USER, ASSISTANT = "USER", "ASSISTANT"
COMMANDS_HELP = (
    "!!exit (or an empty message) quits, !!reset starts over, !!remove drops the last exchange, "
    "!!regen regenerates the last reply, !!save FILE / !!load FILE keep the conversation as JSON"
)
ROLES = ("system", "user", "assistant")


class GatewayError(Exception):
    """The gateway could not be reached or refused a request; the message says what to do."""


class ConversationFileError(ValueError):
    """A !!load file that is not a conversation."""


@dataclass
class Conversation:
    """The exchanges so far, in OpenAI's message shape, after an optional system prompt."""

    system: str | None = None
    messages: list[dict[str, str]] = field(default_factory=list)

    def request_messages(self) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.messages

    def reset(self) -> None:
        self.messages.clear()

    def remove_last_exchange(self) -> bool:
        """Drop the last reply and the message it answered; False when there is nothing."""
        if not self.messages:
            return False
        if self.messages[-1]["role"] == "assistant":
            self.messages.pop()
        if self.messages and self.messages[-1]["role"] == "user":
            self.messages.pop()
        return True

    def take_last_user_message(self) -> str | None:
        """For !!regen: drop the last reply and return (and drop) the message it answered."""
        if self.messages and self.messages[-1]["role"] == "assistant":
            self.messages.pop()
        if self.messages and self.messages[-1]["role"] == "user":
            return self.messages.pop()["content"]
        return None

    def to_json(self, model: str) -> dict[str, Any]:
        return {"model": model, "messages": self.request_messages()}

    @classmethod
    def from_json(cls, data: Any) -> Conversation:
        """Our own files ({"messages": [{"role", "content"}...]}) or FastChat's `conv.dict()`
        ({"system_message", "roles", "messages": [[role, text], ...]})."""
        if not isinstance(data, dict) or not isinstance(data.get("messages"), list):
            raise ConversationFileError("expected a JSON object with a 'messages' list")
        conversation = cls(system=data.get("system_message") or None)
        fastchat_roles = data.get("roles") or [USER, ASSISTANT]
        for entry in data["messages"]:
            if isinstance(entry, list) and len(entry) == 2:  # FastChat: [role name, text]
                role = "user" if entry[0] == fastchat_roles[0] else "assistant"
                entry = {"role": role, "content": entry[1]}
            if not (
                isinstance(entry, dict)
                and entry.get("role") in ROLES
                and isinstance(entry.get("content"), str)
            ):
                raise ConversationFileError(f"not a chat message: {json.dumps(entry)[:80]}")
            if entry["role"] == "system":
                conversation.system = entry["content"]
            else:
                conversation.messages.append({"role": entry["role"], "content": entry["content"]})
        return conversation


@dataclass
class Reply:
    text: str
    completion_tokens: int | None  # from the stream's usage chunk, when the gateway sent one
    seconds: float
    first_token_seconds: float | None
    interrupted: bool = False

    def speed_line(self) -> str:
        """What --debug prints after each reply."""
        tokens = self.completion_tokens
        rate = (
            f"{tokens / self.seconds:.1f} tokens/s" if tokens and self.seconds > 0 else "? tokens/s"
        )
        first = f"{self.first_token_seconds:.2f}" if self.first_token_seconds is not None else "?"
        return (
            f"[debug] {tokens if tokens is not None else '?'} tokens in {self.seconds:.2f} s: "
            f"{rate} (first token after {first} s)"
        )


class GatewayClient:
    """The two calls the chat makes, with the gateway's errors turned into clear messages."""

    def __init__(self, url: str, api_key: str | None, timeout: float = 600.0) -> None:
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._has_key = bool(api_key)
        # A long reply may take minutes; a gateway that does not even accept the connection is down.
        self._options: dict[str, Any] = {
            "base_url": self.url,
            "headers": headers,
            "timeout": httpx.Timeout(timeout, connect=10.0),
        }
        self._http = httpx.Client(**self._options)

    def close(self) -> None:
        self._http.close()

    def list_models(self) -> list[str]:
        with _transport_errors(self.url):
            response = self._http.get("/v1/models")
        self._raise_for_status(response.status_code, response.content)
        return [str(model["id"]) for model in response.json().get("data", [])]

    async def stream_chat(self, body: dict[str, Any]) -> AsyncIterator[str | int]:
        """Yield the reply's text pieces, then its completion token count (an int) if sent. An
        async client of its own: the caller runs each reply in an event loop of its own."""
        with _transport_errors(self.url):
            async with (
                httpx.AsyncClient(**self._options) as http,
                http.stream("POST", "/v1/chat/completions", json=body) as response,
            ):
                if response.status_code != 200:
                    self._raise_for_status(response.status_code, await response.aread())
                async for item in _stream_items(response):
                    yield item

    def _raise_for_status(self, status: int, body: bytes) -> None:
        if status == 200:
            return
        try:
            message = _error_message(json.loads(body))
        except ValueError:
            message = body.decode(errors="replace")[:200] or f"HTTP {status}"
        if status == 401:
            hint = (
                "the gateway refused the API key given with --api-key"
                if self._has_key
                else "the gateway requires an API key: pass --api-key KEY "
                "(or set CHATFLEET_API_KEY)"
            )
            raise GatewayError(f"{hint} ({message})")
        raise GatewayError(f"{message} (HTTP {status})")


async def _stream_items(response: httpx.Response) -> AsyncIterator[str | int]:
    """The text pieces of an OpenAI chat stream, then its completion token count if sent."""
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line[len("data:") :].strip()
        if data == "[DONE]":
            return
        chunk = json.loads(data)
        if "error" in chunk:  # the stream failed after it started
            raise GatewayError(_error_message(chunk))
        for choice in chunk.get("choices") or []:
            content = (choice.get("delta") or {}).get("content")
            if content:
                yield content
        usage = chunk.get("usage")
        if usage and usage.get("completion_tokens") is not None:
            yield int(usage["completion_tokens"])


@contextlib.contextmanager
def _transport_errors(url: str) -> Iterator[None]:
    """Turn httpx's transport errors into a GatewayError that says what to do."""
    try:
        yield
    except httpx.ConnectError as error:
        raise GatewayError(
            f"cannot reach the gateway at {url}: is it running? "
            "(`chatfleet up` starts one; --url points elsewhere)"
        ) from error
    except httpx.TimeoutException as error:
        raise GatewayError(f"the gateway at {url} did not answer in time") from error
    except httpx.TransportError as error:
        raise GatewayError(f"lost the connection to the gateway at {url}: {error}") from error


def _error_message(payload: Any) -> str:
    error = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(error, dict):
        return str(error.get("message") or error)
    return str(error or payload)


class PlainOutput:
    """--style simple: the reply's text as it comes, nothing else (fit for pipes)."""

    def info(self, text: str) -> None:
        print(text, flush=True)

    def error(self, text: str) -> None:
        print(f"error: {text}", file=sys.stderr, flush=True)

    def show_message(self, role: str, text: str) -> None:
        print(f"{role}: {text}", flush=True)

    @contextlib.contextmanager
    def reply(self) -> Iterator[Callable[[str], None]]:
        """Show a reply as it streams: the context gives the function that adds a piece."""
        print(f"{ASSISTANT}: ", end="", flush=True)
        try:
            yield lambda piece: print(piece, end="", flush=True)
        finally:
            print(flush=True)


class RichOutput:
    """--style rich: the reply rendered as Markdown, re-rendered live as tokens arrive."""

    def __init__(self) -> None:
        self.console = Console()

    def info(self, text: str) -> None:
        self.console.print(text, style="dim", markup=False, highlight=False)

    def error(self, text: str) -> None:
        self.console.print(f"[bold red]error:[/bold red] {escape(text)}")

    def show_message(self, role: str, text: str) -> None:
        self.console.print(f"[bold]{role}:[/bold]")
        self.console.print(Markdown(_markdown_lines(text)))

    @contextlib.contextmanager
    def reply(self) -> Iterator[Callable[[str], None]]:
        """Show a reply as it streams: the context gives the function that adds a piece."""
        self.console.print(f"[bold]{ASSISTANT}:[/bold]")
        text = ""
        parsed_at = 0.0
        with Live(console=self.console, refresh_per_second=8, vertical_overflow="visible") as live:

            def add(piece: str) -> None:
                nonlocal text, parsed_at
                text += piece
                # Parse the Markdown once per refresh, not per token (which is quadratic).
                if time.monotonic() - parsed_at >= 0.1:
                    live.update(Markdown(_markdown_lines(text)))
                    parsed_at = time.monotonic()

            try:
                yield add
            finally:
                live.update(Markdown(_markdown_lines(text)))


Output = PlainOutput | RichOutput


def _markdown_lines(text: str) -> str:
    """Keep the model's single line breaks: Markdown would join them into one paragraph, so each
    line outside code blocks ends in two spaces (a hard break), as FastChat's rich chat does."""
    lines: list[str] = []
    in_code = False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            in_code = not in_code
            lines.append(line)
        else:
            lines.append(line if in_code else line + "  ")
    return "\n".join(lines)


@contextlib.contextmanager
def _sigint_cancels(task: asyncio.Task[Any]) -> Iterator[None]:
    """While in the context, Ctrl-C cancels `task` (through the loop's wakeup fd, so it is never
    lost, whatever the task is blocked on)."""
    loop = task.get_loop()
    try:
        loop.add_signal_handler(signal.SIGINT, task.cancel)
        installed = True
    except (NotImplementedError, RuntimeError, ValueError):  # Windows, or not the main thread
        installed = False
    try:
        yield
    finally:
        if installed:
            loop.remove_signal_handler(signal.SIGINT)


def read_message(multiline: bool) -> str:
    """One user message. Multiline (FastChat's simple chat): lines until Ctrl-D on an empty line.
    Raises EOFError when the input has ended."""
    if not multiline:
        return input(f"{USER}: ")
    lines = [input(f"{USER} [Ctrl-D on an empty line to send]: ")]
    while True:
        try:
            lines.append(input())
        except EOFError:
            break
    return "\n".join(lines).strip()


@dataclass(frozen=True)
class ChatOptions:
    model: str
    temperature: float
    max_tokens: int
    multiline: bool = False
    debug: bool = False


class ChatSession:
    """The read-command-or-message loop over one conversation."""

    def __init__(
        self,
        client: GatewayClient,
        options: ChatOptions,
        output: Output,
        conversation: Conversation,
    ) -> None:
        self.client = client
        self.options = options
        self.out = output
        self.conversation = conversation

    def run(self) -> int:
        while True:
            try:
                text = read_message(self.options.multiline)
            except EOFError:
                text = ""
            except KeyboardInterrupt:
                print()
                return 130
            command = text.strip()
            if not command or command == "!!exit":
                self.out.info("exit...")
                return 0
            if command.startswith("!!"):
                message = self.command(command)
                if message is None:
                    continue
                text = message
            self.send(text)

    def command(self, command: str) -> str | None:
        """Run a !! command; returns a message to send (for !!regen) or None."""
        name, _, argument = command.partition(" ")
        argument = argument.strip()
        if name == "!!reset":
            self.conversation.reset()
            self.out.info("resetting...")
        elif name == "!!remove":
            if self.conversation.remove_last_exchange():
                self.out.info("removed the last exchange")
            else:
                self.out.info("no messages to remove")
        elif name == "!!regen":
            last = self.conversation.take_last_user_message()
            if last is None:
                self.out.info("no message to regenerate a reply for")
                return None
            self.out.info("regenerating the last reply...")
            return last
        elif name == "!!save":
            self.save(argument)
        elif name == "!!load":
            self.load(argument)
        else:
            self.out.info(f"unknown command {name}: {COMMANDS_HELP}")
        return None

    def save(self, argument: str) -> None:
        if not argument:
            self.out.info("usage: !!save FILE")
            return
        path = Path(argument if "." in Path(argument).name else argument + ".json").expanduser()
        try:
            path.write_text(json.dumps(self.conversation.to_json(self.options.model), indent=2))
        except OSError as error:
            self.out.error(f"cannot save to {path}: {error.strerror or error}")
            return
        self.out.info(f"saved the conversation to {path}")

    def load(self, argument: str) -> None:
        if not argument:
            self.out.info("usage: !!load FILE")
            return
        path = Path(argument).expanduser()
        if not path.exists() and path.with_name(path.name + ".json").exists():
            path = path.with_name(path.name + ".json")
        try:
            loaded = Conversation.from_json(json.loads(path.read_text()))
        except OSError as error:
            self.out.error(f"cannot read {path}: {error.strerror or error}")
            return
        except ValueError as error:  # JSON or shape
            self.out.error(f"{path} is not a conversation file: {error}")
            return
        self.conversation = loaded
        self.out.info(f"loaded {len(loaded.messages)} messages from {path}")
        for message in loaded.messages:
            role = USER if message["role"] == "user" else ASSISTANT
            self.out.show_message(role, message["content"])

    def send(self, text: str) -> None:
        """Send one user message; on success the exchange joins the conversation."""
        self.conversation.messages.append({"role": "user", "content": text})
        try:
            reply = self.complete()
        except GatewayError as error:
            self.conversation.messages.pop()
            self.out.error(str(error))
            return
        self.conversation.messages.append({"role": "assistant", "content": reply.text})
        if reply.interrupted:
            self.out.info("(stopped)")
        if self.options.debug:
            self.out.info(reply.speed_line())

    def complete(self) -> Reply:
        body = {
            "model": self.options.model,
            "messages": self.conversation.request_messages(),
            "stream": True,
            "stream_options": {"include_usage": True},
            "temperature": self.options.temperature,
            "max_tokens": self.options.max_tokens,
        }
        started = time.monotonic()
        timing: dict[str, float] = {}
        tokens: list[int] = []
        received: list[str] = []

        async def receive() -> bool:
            """Stream the reply; True when Ctrl-C stopped it. Cancelling the task closes the
            stream, which drops the HTTP connection: the gateway then cancels generation."""
            task = asyncio.current_task()
            assert task is not None
            with _sigint_cancels(task), self.out.reply() as show:
                try:
                    async for item in self.client.stream_chat(body):
                        if isinstance(item, int):
                            tokens.append(item)
                            continue
                        timing.setdefault("first", time.monotonic() - started)
                        received.append(item)
                        show(item)
                except asyncio.CancelledError:
                    return True
            return False

        try:
            interrupted = asyncio.run(receive())
        except KeyboardInterrupt:  # where the loop cannot take SIGINT (not the main thread)
            interrupted = True
        return Reply(
            text="".join(received),
            completion_tokens=tokens[-1] if tokens else None,
            seconds=time.monotonic() - started,
            first_token_seconds=timing.get("first"),
            interrupted=interrupted,
        )


def chat(
    url: str,
    options: ChatOptions,
    api_key: str | None,
    system: str | None,
    style: str,
) -> int:
    output: Output = RichOutput() if style == "rich" else PlainOutput()
    client = GatewayClient(url, api_key)
    try:
        models = client.list_models()
        if options.model not in models:
            served = ", ".join(models) or "no models yet"
            output.error(f"unknown model {options.model!r}: the gateway serves {served} (--model)")
            return 1
        if style == "rich":
            output.info(f"chatfleet chat with {options.model} at {client.url}")
            output.info(COMMANDS_HELP)
        session = ChatSession(client, options, output, Conversation(system=system))
        return session.run()
    except GatewayError as error:
        output.error(str(error))
        return 1
    finally:
        client.close()


def main(argv: list[str] | None = None) -> int:
    parser, flags = new_parser(
        "chat",
        "Chat with a model in the terminal through the gateway (FastChat's cli commands: "
        + COMMANDS_HELP
        + ").",
    )
    flags.add("--url", default="http://127.0.0.1:8000", help="the gateway's base URL")
    flags.add("--model", default=DEFAULT_MODEL, help="the model to chat with")
    flags.add("--api-key", default=None, help="gateway API key, if it requires one")
    flags.add("--system", default=None, help="an optional system prompt")
    flags.add("--temperature", default=0.7, type=float, help="sampling temperature")
    flags.add(
        "--max-tokens", "--max-new-tokens", default=512, type=int, help="maximum tokens per reply"
    )
    flags.add(
        "--style",
        default="rich",
        choices=("rich", "simple"),
        help="rich: replies rendered as Markdown while they stream; simple: plain text (for pipes)",
    )
    flags.add_bool(
        "--multiline",
        help="messages span several lines and end with Ctrl-D on an empty line (as in FastChat)",
    )
    flags.add_bool("--debug", help="print tokens/s and time to the first token after each reply")
    ns = parser.parse_args(argv)
    if sys.stdin.isatty():
        import readline  # noqa: F401  (line editing and history for input())
    options = ChatOptions(
        model=ns.model,
        temperature=ns.temperature,
        max_tokens=ns.max_tokens,
        multiline=ns.multiline,
        debug=ns.debug,
    )
    try:
        return chat(ns.url, options, ns.api_key, ns.system, ns.style)
    except KeyboardInterrupt:
        return 130
