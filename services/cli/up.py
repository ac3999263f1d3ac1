"""`chatfleet up`: controller, worker and gateway on one machine with the default models.

While they start, each service's output becomes one status line (the worker's shows which model
is loading and transformers' progress percentages); warnings and errors are shown as they come,
and a service that fails shows its last lines. Once everything is ready it prints which URL
serves what, then passes the services' logs through.
"""

from __future__ import annotations

import argparse
import asyncio
import codecs
import contextlib
import os
import re
import signal
import sys
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import TracebackType

import httpx
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TaskID, TextColumn

from services.cli.launcher import ServiceExited, ServiceProcess
from services.cli.main import new_parser, run
from services.common.config import FlagParser
from services.common.security import security_from_environ

# Loading the default models from disk takes a few seconds on a laptop; slow disks get more.
READY_TIMEOUT_S = 600.0
SERVICES = ("controller", "worker", "gateway")
TAIL_LINES = 40  # of a service's output, shown when it fails to start


def build_parser() -> tuple[argparse.ArgumentParser, FlagParser]:
    parser, flags = new_parser(
        "up", "Start controller, worker and gateway on this machine and print what serves where."
    )
    flags.add("--host", default="127.0.0.1", help="address every service binds")
    flags.add("--port", default=8000, type=int, help="gateway HTTP port", env="CHATFLEET_UP_PORT")
    flags.add("--controller-port", default=21001, type=int, help="controller gRPC port")
    flags.add("--worker-port", default=21002, type=int, help="worker gRPC port")
    flags.add("--device", default="auto", help="worker device: auto, cpu, cuda, cuda:N or mps")
    flags.add("--dtype", default="auto", help="worker dtype: auto, float32, float16 or bfloat16")
    flags.add(
        "--api-keys",
        default=[],
        nargs="*",
        help="keys the gateway requires as 'Authorization: Bearer KEY' (comma-separated in env)",
        env="CHATFLEET_UP_API_KEYS",
    )
    flags.add("--log-level", default="INFO", help="log level of every service")
    flags.add_bool(
        "--show-logs",
        help="print every log line of the services while they start, not only a status line each",
    )
    return parser, flags


# ---- What the services' output says about their start-up -------------------------------------

_LISTENING = re.compile(r"listening on (?P<address>\S+)")
_LOADING = re.compile(r"loading (?P<name>\S+) from ")  # services.worker.engine.loading
_LOADING_STEP = re.compile(r"loading (?P<name>\S+): (?P<step>.+)$")
_LOADED = re.compile(r"loaded (?P<name>\S+) \(.*\) in (?P<seconds>[\d.]+)s")
# A tqdm bar: "Converting and de-quantizing GGUF tensors...:  45%|####      | 123/272 [...]"
_PROGRESS = re.compile(r"(?P<what>[^|]*?)[.:\s]*(?P<percent>\d{1,3})%\|")
_PROBLEM = re.compile(r"\b(WARNING|ERROR|CRITICAL)\b|^Traceback|^\w*(Error|Exception):")


@dataclass
class ServiceStatus:
    """A service's start-up as one line: what it is doing, and how far (percent) if known."""

    text: str = "waiting"
    percent: int | None = None
    ready: bool = False
    loading: str | None = None  # the model being loaded
    loaded: list[str] = field(default_factory=list)

    def interpret(self, segment: str) -> bool:
        """Update from one line (or progress-bar redraw) of output; True if the status changed."""
        before = (self.text, self.percent)
        if match := _PROGRESS.search(segment):
            what = match["what"].strip() or "loading"
            model = f"{self.loading}: " if self.loading else ""
            self.text, self.percent = f"loading {model}{what}", min(int(match["percent"]), 100)
        elif match := _LOADING.search(segment):
            self.loading = match["name"]
            self.text, self.percent = f"loading {self.loading}", None
        elif match := _LOADED.search(segment):
            self.loaded.append(match["name"])
            self.loading = None
            self.text, self.percent = f"loaded {match['name']} in {match['seconds']} s", None
        elif match := _LOADING_STEP.search(segment):
            self.text, self.percent = f"loading {match['name']}: {match['step']}", None
        elif (match := _LISTENING.search(segment)) and not self.ready:
            self.text, self.percent = f"listening on {match['address']}, starting", None
        return (self.text, self.percent) != before


def is_problem(line: str) -> bool:
    """Lines worth showing even while the output is summarised."""
    return bool(_PROBLEM.search(line))


class SegmentSplitter:
    """Cuts a byte stream into lines (ended by \\n) and progress-bar redraws (ended by \\r, or
    still being written)."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""

    def feed(self, data: bytes) -> Iterator[tuple[str, bool]]:
        """Yield (segment, is_line); the unfinished tail comes last with is_line False."""
        self._pending += self._decoder.decode(data)
        *complete, self._pending = re.split(r"(\r\n|\r|\n)", self._pending)
        # re.split with a group alternates text and separators.
        for text, separator in zip(complete[::2], complete[1::2], strict=True):
            if text.strip():
                yield text, separator != "\r"
        if self._pending.strip():
            yield self._pending, False


# ---- Showing it -----------------------------------------------------------------------------


class StartupDisplay:
    """One status line per service while they start: a live progress display on a terminal,
    plain lines when they change otherwise (in a pipe or CI log). Once everything is ready
    (`passthrough`), the services' output lines are printed as they are."""

    def __init__(self, console: Console, show_logs: bool = False) -> None:
        self.console = console
        self.show_logs = show_logs
        self.statuses = {name: ServiceStatus() for name in SERVICES}
        self.tails: dict[str, deque[str]] = {name: deque(maxlen=TAIL_LINES) for name in SERVICES}
        self.passthrough = False
        self._printed: dict[str, tuple[str, int | None]] = {}
        self._progress: Progress | None = None
        self._tasks: dict[str, TaskID] = {}

    def __enter__(self) -> StartupDisplay:
        if self.console.is_terminal:
            self._progress = Progress(
                SpinnerColumn(finished_text="[green]✓"),
                TextColumn("[bold]{task.fields[service]:<10}"),
                BarColumn(bar_width=24),
                TextColumn("{task.description}"),
                console=self.console,
                transient=False,
            )
            self._progress.start()
            for name in SERVICES:
                self._tasks[name] = self._progress.add_task(
                    "waiting", service=name, total=None, start=False
                )
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def feed(self, service: str, segment: str, is_line: bool) -> None:
        """A segment of a service's output."""
        if self.passthrough:
            if is_line:
                print(segment, flush=True)
            return
        if is_line:
            self.tails[service].append(segment)
            if self.show_logs or is_problem(segment):
                self._print(f"{service} | {segment}")
        status = self.statuses[service]
        if status.interpret(segment):
            self._show(service)

    def set(self, service: str, text: str, *, ready: bool = False) -> None:
        status = self.statuses[service]
        status.text, status.percent, status.ready = text, None, ready
        self._show(service)

    def tail(self, service: str) -> list[str]:
        return list(self.tails[service])

    def _print(self, text: str) -> None:
        if self._progress is not None:
            self._progress.console.print(text, markup=False, highlight=False)
        else:
            print(text, flush=True)

    def _show(self, service: str) -> None:
        status = self.statuses[service]
        if self._progress is not None:
            task = self._tasks[service]
            self._progress.start_task(task)
            if status.ready:
                self._progress.update(task, description=status.text, total=1, completed=1)
            # reset, not update: a bar that reached 100% would otherwise stay "finished" (✓).
            elif status.percent is not None:
                self._progress.reset(
                    task,
                    description=f"{status.text} {status.percent}%",
                    total=100,
                    completed=status.percent,
                )
            else:
                self._progress.reset(task, description=status.text, total=None, completed=0)
            return
        # Without a terminal: a line per change, and percentages only every quarter.
        shown = (status.text, None if status.percent is None else status.percent // 25)
        if self._printed.get(service) == shown:
            return
        self._printed[service] = shown
        percent = "" if status.percent is None else f" {status.percent}%"
        print(f"chatfleet: {service}: {status.text}{percent}", flush=True)


async def follow_output(service: ServiceProcess, display: StartupDisplay) -> None:
    """Feed a service's captured output to the display until the service closes it."""
    assert service.process is not None and service.process.stdout is not None
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), service.process.stdout
    )
    splitter = SegmentSplitter()
    try:
        while data := await reader.read(65536):
            for segment, is_line in splitter.feed(data):
                display.feed(service.name, segment, is_line)
    finally:
        transport.close()


# ---- What serves where ----------------------------------------------------------------------


@dataclass(frozen=True)
class Endpoints:
    """What `chatfleet up` started, for the ready message."""

    base_url: str  # the gateway, e.g. http://127.0.0.1:8000
    controller_address: str
    worker_address: str
    models: tuple[str, ...] = ()
    web_ui: bool = True
    metrics: bool = True
    api_key_required: bool = False
    grpc_token: bool = False  # the internal services require CHATFLEET_GRPC_TOKEN
    grpc_ca: str | None = None  # TLS: the CA file grpcurl verifies the servers with


def format_ready(endpoints: Endpoints) -> str:
    """The message printed once everything is ready: each URL and what it serves."""
    url = endpoints.base_url
    key_flag = " --api-key KEY" if endpoints.api_key_required else ""
    key_header = " -H 'Authorization: Bearer KEY'" if endpoints.api_key_required else ""
    grpcurl = ["grpcurl"]
    grpcurl.append(f"-cacert {endpoints.grpc_ca}" if endpoints.grpc_ca else "-plaintext")
    if endpoints.grpc_token:
        grpcurl.append('-H "authorization: Bearer $CHATFLEET_GRPC_TOKEN"')
    grpcurl_command = " ".join(grpcurl)
    rows = [("OpenAI API", f"{url}/v1", f"OPENAI_BASE_URL={url}/v1")]
    if endpoints.web_ui:
        rows.append(("web UI", f"{url}/", "chat, side by side, arena"))
    rows.append(("API docs", f"{url}/docs", "OpenAPI (Swagger UI)"))
    if endpoints.metrics:
        rows.append(("metrics", f"{url}/metrics", "Prometheus"))
    for name, address in (
        ("controller", endpoints.controller_address),
        ("worker", endpoints.worker_address),
    ):
        rows.append((name, f"{address} (gRPC)", f"{grpcurl_command} {address} list"))
    width = max(len(target) for _, target, _ in rows)
    models = ", ".join(endpoints.models) if endpoints.models else "none listed yet"
    lines = ["", f"chatfleet is up. Models: {models}", ""]
    lines += [f"  {name:<11} {target:<{width}}  {hint}".rstrip() for name, target, hint in rows]
    example_model = endpoints.models[0] if endpoints.models else "SmolLM2-135M-Instruct"
    lines += [
        "",
        f"  chat in the terminal: chatfleet chat --url {url}{key_flag}",
        f"  try: curl {url}/v1/chat/completions -H 'Content-Type: application/json'{key_header} "
        f"""-d '{{"model": "{example_model}", "messages": [{{"role": "user", """
        """"content": "What is the capital of France?"}]}'""",
        "",
        "Press Ctrl-C to stop.",
    ]
    return "\n".join(lines)


def display_host(host: str) -> str:
    """An address to print for a bind address (a wildcard bind is reachable on loopback)."""
    return "127.0.0.1" if host in ("", "0.0.0.0", "::", "[::]") else host


async def discover(base_url: str, api_key: str | None) -> tuple[tuple[str, ...], bool, bool]:
    """The gateway's models, and whether it serves the web UI and metrics (other parts of the
    gateway add those; list only what answers)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=10.0) as client:

        async def answers(path: str) -> bool:
            with contextlib.suppress(httpx.HTTPError):
                return (await client.get(path)).status_code == 200
            return False

        models: tuple[str, ...] = ()
        with contextlib.suppress(httpx.HTTPError, ValueError, KeyError, TypeError):
            response = await client.get("/v1/models")
            models = tuple(str(model["id"]) for model in response.json()["data"])
        return models, await answers("/"), await answers("/metrics")


# ---- The command ----------------------------------------------------------------------------


@dataclass(frozen=True)
class UpOptions:
    host: str
    port: int
    controller_port: int
    worker_port: int
    device: str
    dtype: str
    api_keys: tuple[str, ...]
    log_level: str
    show_logs: bool = False


async def up(options: UpOptions, console: Console | None = None) -> int:
    host = options.host
    controller_address = f"{host}:{options.controller_port}"
    worker_address = f"{host}:{options.worker_port}"
    common = ["--log-level", options.log_level]
    controller = ServiceProcess(
        "controller",
        ["--host", host, "--port", str(options.controller_port), *common],
        capture_output=True,
    )
    worker = ServiceProcess(
        "worker",
        [
            "--host", host, "--port", str(options.worker_port),
            "--controller-address", controller_address,
            "--device", options.device, "--dtype", options.dtype, *common,
        ],
        capture_output=True,
    )  # fmt: skip
    gateway_args = [
        "--host", host, "--port", str(options.port), "--controller-address", controller_address
    ]  # fmt: skip
    if options.api_keys:
        gateway_args += ["--api-keys", ",".join(options.api_keys)]
    gateway = ServiceProcess("gateway", [*gateway_args, *common], capture_output=True)
    url = f"http://{display_host(host)}:{options.port}"
    started: list[ServiceProcess] = []
    followers: list[asyncio.Future[None]] = []
    display = StartupDisplay(console or Console(), show_logs=options.show_logs)

    def start(service: ServiceProcess, status: str) -> None:
        service.start()
        started.append(service)
        followers.append(asyncio.ensure_future(follow_output(service, display)))
        display.set(service.name, status)

    async def start_all() -> None:
        with display:
            start(controller, "starting")
            await controller.wait_grpc_serving(controller_address, READY_TIMEOUT_S)
            display.set("controller", f"ready, gRPC on {controller_address}", ready=True)
            start(worker, "starting (loading the default models)")
            await worker.wait_grpc_serving(worker_address, READY_TIMEOUT_S)
            loaded = display.statuses["worker"].loaded
            display.set(
                "worker", f"ready ({len(loaded)} models), gRPC on {worker_address}", ready=True
            )
            start(gateway, "starting")
            await gateway.wait_http_ok(f"{url}/health", READY_TIMEOUT_S)
            display.set("gateway", f"ready, HTTP on {url}", ready=True)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    stopper = asyncio.ensure_future(stop.wait())
    try:
        starting = asyncio.ensure_future(start_all())
        await asyncio.wait({starting, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if stop.is_set():
            # Ctrl-C while starting (the services got it too, and may already have exited).
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError, ServiceExited, TimeoutError):
                await starting
            return 130
        try:
            starting.result()
        except (ServiceExited, TimeoutError) as error:
            await _report_failure(error, started, followers, display)
            return 1
        models, web_ui, metrics = await discover(
            url, options.api_keys[0] if options.api_keys else None
        )
        security = security_from_environ(os.environ)
        print(
            format_ready(
                Endpoints(
                    base_url=url,
                    controller_address=controller_address,
                    worker_address=worker_address,
                    models=models,
                    web_ui=web_ui,
                    metrics=metrics,
                    api_key_required=bool(options.api_keys),
                    grpc_token=security.token is not None,
                    grpc_ca=security.tls_ca,
                )
            ),
            flush=True,
        )
        display.passthrough = True
        exits = [asyncio.ensure_future(p.wait_exit()) for p in started]
        await asyncio.wait({stopper, *exits}, return_when=asyncio.FIRST_COMPLETED)
        for task in exits:
            task.cancel()
        if not stop.is_set():  # a service ended on its own (Ctrl-C reaches them too)
            print("chatfleet: a service exited; stopping the others", file=sys.stderr)
            return 1
        return 0
    finally:
        stopper.cancel()
        print("chatfleet: stopping...", flush=True)
        for process in reversed(started):
            with contextlib.suppress(ProcessLookupError):
                await process.stop()
        # The services closed their output when they ended; let the followers finish.
        await asyncio.gather(*followers, return_exceptions=True)


async def _report_failure(
    error: Exception,
    started: list[ServiceProcess],
    followers: list[asyncio.Future[None]],
    display: StartupDisplay,
) -> None:
    """Say what failed, with the last lines the failing service printed."""
    print(f"chatfleet: {error}", file=sys.stderr, flush=True)
    failed = next((p for p in started if p.returncode() is not None), started[-1])
    follower = followers[started.index(failed)]
    # Its output ends when it exits: read it to the end before showing the tail.
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(asyncio.shield(follower), 5.0)
    tail = display.tail(failed.name)
    if tail:
        print(f"chatfleet: the last lines of the {failed.name}:", file=sys.stderr)
        for line in tail:
            print(f"  {line}", file=sys.stderr)
    sys.stderr.flush()


def main(argv: list[str] | None = None) -> int:
    parser, _ = build_parser()
    ns = parser.parse_args(argv)
    options = UpOptions(
        host=ns.host,
        port=ns.port,
        controller_port=ns.controller_port,
        worker_port=ns.worker_port,
        device=ns.device,
        dtype=ns.dtype,
        api_keys=tuple(ns.api_keys),
        log_level=ns.log_level,
        show_logs=ns.show_logs,
    )
    return run(up(options))
