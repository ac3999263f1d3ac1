"""The controller at fleet scale: registers simulated workers with a real in-process controller and
measures the cost of a dispatch decision (SelectWorker), its throughput and the controller's memory.

    .venv/bin/python -m bench.controller_dispatch [--workers 10,100,1000] [--seconds 5]

Simulated workers are real grpc.aio health servers, SERVING: one server in a child process answers
on 0.0.0.0:PORT, and each worker registers a loopback address of its own (127.1.x.y:PORT), so the
controller holds one channel, TCP connection and health Watch stream per worker, as with real
workers. Load (SelectWorker calls, and every worker's heartbeat at --heartbeat-interval) comes from
a second child process, and a third holds one health Watch on the controller per worker (as real
workers do), so the controller's process holds only the controller and the probes below.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import random
import resource
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from bench.metrics import percentile
from chatfleet.v1 import common_pb2, controller_pb2, controller_pb2_grpc
from services.common.grpc_server import SERVER_OPTIONS, insecure_channel
from services.controller.config import ControllerConfig
from services.controller.dispatcher import Dispatcher, DispatchMethod
from services.controller.main import Controller

CHAT_MODEL = "SmolLM2-135M-Instruct"
EMBEDDING_MODEL = "all-MiniLM-L6-v2"
# Every simulated worker serves both models, as a default worker does: each decision for the chat
# model then chooses among the whole fleet (the worst case for one model).
MODELS = [
    common_pb2.ModelInfo(
        name=CHAT_MODEL,
        kind=common_pb2.MODEL_KIND_GENERATE,
        context_length=8192,
        supports_chat=True,
        supports_embeddings=True,
    ),
    common_pb2.ModelInfo(
        name=EMBEDDING_MODEL,
        kind=common_pb2.MODEL_KIND_EMBED,
        context_length=512,
        supports_embeddings=True,
    ),
]
CAPACITY = 32
REGISTER_CONCURRENCY = 50
IDLE_WINDOW_S = 2.0


def worker_address(index: int, port: int) -> str:
    """The index-th simulated worker: a loopback address of its own (all of 127/8 reaches lo)."""
    return f"127.1.{index // 250}.{index % 250 + 1}:{port}"


def random_load(rng: random.Random) -> common_pb2.Load:
    running = rng.randint(0, CAPACITY)
    return common_pb2.Load(running=running, waiting=rng.randint(0, 4), capacity=CAPACITY)


def rss_bytes() -> int:
    """This process's resident set size, from /proc (the kernel's figure, not the allocator's)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def raise_open_files_limit() -> None:
    # One socket per simulated worker on each side of every connection.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def summary_us(seconds: Sequence[float]) -> dict[str, float]:
    p50, p99 = percentile(seconds, 50), percentile(seconds, 99)
    assert p50 is not None and p99 is not None
    return {"p50_us": round(p50 * 1e6, 1), "p99_us": round(p99 * 1e6, 1)}


# --- child: the simulated fleet's health server --------------------------------------------------


async def serve_fleet() -> None:
    """One health server, SERVING, on all interfaces; prints its port, runs until killed."""
    server = grpc.aio.server(options=SERVER_OPTIONS)
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("0.0.0.0:0")
    await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    await server.start()
    print(port, flush=True)
    await server.wait_for_termination()


# --- child: the workers' own Watch on the controller -----------------------------------------


async def watch_controller(controller: str, count: int) -> None:
    """Hold `count` health Watch streams on the controller, each over a connection of its own, as
    `count` workers do (each watches the controller to re-register at once after a restart).
    Prints "ready" once every stream has reported; runs until killed."""
    # A local subchannel pool per channel: otherwise channels to one target share a connection.
    options = [("grpc.use_local_subchannel_pool", 1)]
    channels = [grpc.aio.insecure_channel(controller, options=options) for _ in range(count)]
    first_reports: list[asyncio.Future[None]] = []

    async def hold(channel: grpc.aio.Channel, reported: asyncio.Future[None]) -> None:
        stub = health_pb2_grpc.HealthStub(channel)
        async for _ in stub.Watch(health_pb2.HealthCheckRequest(service=""), wait_for_ready=True):
            if not reported.done():
                reported.set_result(None)

    loop = asyncio.get_running_loop()
    streams = []
    for channel in channels:
        reported: asyncio.Future[None] = loop.create_future()
        first_reports.append(reported)
        streams.append(asyncio.ensure_future(hold(channel, reported)))
    await asyncio.gather(*first_reports)
    print("ready", flush=True)
    await asyncio.gather(*streams)


# --- child: the load generator -------------------------------------------------------------------


async def generate_load(
    controller: str, seconds: float, concurrency: int, workers: int, port: int, interval: float
) -> dict[str, float]:
    """`concurrency` closed loops of SelectWorker for `seconds`, while every simulated worker
    sends a heartbeat every `interval` seconds (spread evenly). Prints nothing; returns figures."""
    rng = random.Random(1)
    latencies: list[float] = []
    heartbeats = 0
    async with insecure_channel(controller) as channel:
        stub = controller_pb2_grpc.ControllerServiceStub(channel)
        await stub.ListModels(controller_pb2.ListModelsRequest(), wait_for_ready=True)
        loop = asyncio.get_running_loop()
        start = loop.time()
        end = start + seconds

        async def select_loop() -> None:
            request = controller_pb2.SelectWorkerRequest(model=CHAT_MODEL)
            while loop.time() < end:
                began = time.perf_counter()
                await stub.SelectWorker(request, timeout=10)
                latencies.append(time.perf_counter() - began)

        async def heartbeat_loop() -> None:
            # Paced load generation (not polling): the n-th heartbeat is due at start + n * step.
            nonlocal heartbeats
            step = interval / max(workers, 1)
            in_flight: set[asyncio.Future[controller_pb2.HeartbeatResponse]] = set()
            while workers and (due := start + heartbeats * step) < end:
                await asyncio.sleep(max(0.0, due - loop.time()))
                address = worker_address(heartbeats % workers, port)
                request = controller_pb2.HeartbeatRequest(address=address, load=random_load(rng))
                call = asyncio.ensure_future(stub.Heartbeat(request, timeout=10))
                in_flight.add(call)
                call.add_done_callback(in_flight.discard)
                heartbeats += 1
            await asyncio.gather(*in_flight)

        await asyncio.gather(*(select_loop() for _ in range(concurrency)), heartbeat_loop())
        elapsed = loop.time() - start
    return {
        "selects": len(latencies),
        "selects_per_s": round(len(latencies) / elapsed, 1),
        "heartbeats_per_s": round(heartbeats / elapsed, 1),
        **summary_us(latencies),
    }


# --- the controller's process --------------------------------------------------------------------


@dataclass
class Step:
    """The figures for one fleet size."""

    workers: int
    register_s: float
    rss_mib: float
    rss_growth_mib: float
    rss_per_worker_kib: float
    select_cpu_p50_us: float  # Dispatcher.select in-process, shortest queue, CPU time
    select_cpu_p99_us: float
    lottery_cpu_p50_us: float
    lottery_cpu_p99_us: float
    rpc_p50_us: float  # SelectWorker over gRPC, one at a time, client in this process, wall time
    rpc_p99_us: float
    idle_cpu_percent: float  # this process with nothing calling it; one core = 100
    load_selects_per_s: float  # from the load child, `concurrency` calls in flight
    load_heartbeats_per_s: float
    load_p50_us: float
    load_p99_us: float
    load_cpu_percent: float  # this process during the load window
    # The controller's CPU per SelectWorker under load, heartbeats' share included.
    cpu_us_per_select: float


@contextlib.asynccontextmanager
async def child(*args: str) -> AsyncIterator[asyncio.subprocess.Process]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.controller_dispatch", *args, stdout=asyncio.subprocess.PIPE
    )
    try:
        yield process
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def register(
    stub: controller_pb2_grpc.ControllerServiceStub, indexes: range, port: int, seed: int
) -> None:
    rng = random.Random(seed)
    semaphore = asyncio.Semaphore(REGISTER_CONCURRENCY)

    async def one(index: int) -> None:
        request = controller_pb2.RegisterWorkerRequest(
            address=worker_address(index, port), models=MODELS, load=random_load(rng)
        )
        async with semaphore:
            await stub.RegisterWorker(request, timeout=60)

    await asyncio.gather(*(one(index) for index in indexes))


def time_decisions(dispatcher: Dispatcher, method: DispatchMethod, count: int) -> list[float]:
    """The CPU time of each decision (this thread's clock: immune to being preempted on a busy
    machine, which the wall clock is not)."""
    timings = []
    for _ in range(count):
        began = time.thread_time_ns()
        dispatcher.select(CHAT_MODEL, method=method)
        timings.append((time.thread_time_ns() - began) / 1e9)
    return timings


async def idle_cpu(seconds: float) -> float:
    """The share of a core the controller uses while nobody calls it (keepalives, Watch streams)."""
    cpu, wall = cpu_seconds(), time.perf_counter()
    await asyncio.sleep(seconds)  # measuring idleness: nothing to wait for but time
    return (cpu_seconds() - cpu) / (time.perf_counter() - wall)


async def time_rpcs(stub: controller_pb2_grpc.ControllerServiceStub, count: int) -> list[float]:
    request = controller_pb2.SelectWorkerRequest(model=CHAT_MODEL)
    timings = []
    for _ in range(count):
        began = time.perf_counter()
        await stub.SelectWorker(request, timeout=10)
        timings.append(time.perf_counter() - began)
    return timings


async def run(args: argparse.Namespace) -> list[Step]:
    sizes = sorted({int(size) for size in args.workers.split(",")})
    raise_open_files_limit()
    steps: list[Step] = []
    async with child("--role", "fleet") as fleet:
        assert fleet.stdout is not None
        port = int(await asyncio.wait_for(fleet.stdout.readline(), 60))
        controller = await Controller.start(ControllerConfig(host="127.0.0.1", port=0))
        try:
            address = f"127.0.0.1:{controller.port}"
            async with (
                contextlib.AsyncExitStack() as watchers,
                insecure_channel(address) as channel,
            ):
                stub = controller_pb2_grpc.ControllerServiceStub(channel)
                for _ in range(50):  # warm the channel and the server's code paths
                    await stub.ListModels(controller_pb2.ListModelsRequest(), timeout=10)
                gc.collect()
                baseline = rss_bytes()
                registered = 0
                for size in sizes:
                    began = time.perf_counter()
                    await register(stub, range(registered, size), port, seed=size)
                    register_s = time.perf_counter() - began
                    watcher = await watchers.enter_async_context(
                        child("--role", "watch", "--controller", address,
                              "--registered", str(size - registered))
                    )  # fmt: skip
                    assert watcher.stdout is not None
                    await asyncio.wait_for(watcher.stdout.readline(), 120)
                    registered = size
                    serving = sum(r.state.value == "serving" for r in controller.registry.workers())
                    if serving != size:
                        raise RuntimeError(f"{serving} of {size} simulated workers are SERVING")
                    gc.collect()
                    rss = rss_bytes()
                    dispatcher = Dispatcher(controller.registry)
                    decisions = summary_us(
                        time_decisions(dispatcher, DispatchMethod.SHORTEST_QUEUE, args.decisions)
                    )
                    lottery = summary_us(
                        time_decisions(dispatcher, DispatchMethod.LOTTERY, args.decisions)
                    )
                    rpcs = summary_us(await time_rpcs(stub, args.rpcs))
                    idle = await idle_cpu(IDLE_WINDOW_S)
                    cpu_before = cpu_seconds()
                    wall_before = time.perf_counter()
                    async with child(
                        "--role", "load", "--controller", address,
                        "--seconds", str(args.seconds), "--concurrency", str(args.concurrency),
                        "--registered", str(size), "--fleet-port", str(port),
                        "--heartbeat-interval", str(args.heartbeat_interval),
                    ) as load:  # fmt: skip
                        assert load.stdout is not None
                        loaded = json.loads(await load.stdout.read())
                        await load.wait()
                    # The child's start-up and exit add idle time: take the idle rate off it.
                    busy = (cpu_seconds() - cpu_before) - idle * (
                        time.perf_counter() - wall_before - args.seconds
                    )
                    steps.append(
                        Step(
                            workers=size,
                            register_s=round(register_s, 2),
                            rss_mib=round(rss / 2**20, 1),
                            rss_growth_mib=round((rss - baseline) / 2**20, 1),
                            rss_per_worker_kib=round((rss - baseline) / size / 1024, 1),
                            select_cpu_p50_us=decisions["p50_us"],
                            select_cpu_p99_us=decisions["p99_us"],
                            lottery_cpu_p50_us=lottery["p50_us"],
                            lottery_cpu_p99_us=lottery["p99_us"],
                            rpc_p50_us=rpcs["p50_us"],
                            rpc_p99_us=rpcs["p99_us"],
                            idle_cpu_percent=round(100 * idle, 1),
                            load_selects_per_s=loaded["selects_per_s"],
                            load_heartbeats_per_s=loaded["heartbeats_per_s"],
                            load_p50_us=loaded["p50_us"],
                            load_p99_us=loaded["p99_us"],
                            load_cpu_percent=round(100 * busy / args.seconds, 1),
                            cpu_us_per_select=round(1e6 * busy / loaded["selects"], 1),
                        )
                    )
                    print_step(steps[-1], baseline)
        finally:
            await controller.stop(grace=1)
    return steps


def print_step(step: Step, baseline: int) -> None:
    print(
        f"{step.workers:>5} workers | registered in {step.register_s:.2f} s | "
        f"RSS {step.rss_mib:.1f} MiB (+{step.rss_growth_mib:.1f} MiB over "
        f"{baseline / 2**20:.1f}, {step.rss_per_worker_kib:.1f} KiB/worker) | "
        f"idle CPU {step.idle_cpu_percent:.1f}%\n"
        f"      select() CPU: shortest_queue p50 {step.select_cpu_p50_us:.0f} us "
        f"p99 {step.select_cpu_p99_us:.0f} us | lottery p50 {step.lottery_cpu_p50_us:.0f} us "
        f"p99 {step.lottery_cpu_p99_us:.0f} us\n"
        f"      SelectWorker RPC one at a time (wall): p50 {step.rpc_p50_us:.0f} us "
        f"p99 {step.rpc_p99_us:.0f} us\n"
        f"      under load: {step.load_selects_per_s:.0f} SelectWorker/s + "
        f"{step.load_heartbeats_per_s:.0f} Heartbeat/s, p50 {step.load_p50_us:.0f} us "
        f"p99 {step.load_p99_us:.0f} us, controller CPU {step.load_cpu_percent:.0f}% "
        f"= {step.cpu_us_per_select:.0f} us per SelectWorker",
        flush=True,
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.controller_dispatch", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--workers", default="10,100,1000", help="fleet sizes, cumulative")
    parser.add_argument("--decisions", type=int, default=2000, help="in-process select() calls")
    parser.add_argument("--rpcs", type=int, default=1000, help="sequential SelectWorker calls")
    parser.add_argument("--seconds", type=float, default=5.0, help="load window per fleet size")
    parser.add_argument("--concurrency", type=int, default=16, help="SelectWorker calls in flight")
    parser.add_argument(
        "--heartbeat-interval", type=float, default=5.0, help="seconds between a worker's beats"
    )
    parser.add_argument("--json", help="also write the figures to this file")
    # Internal: the child processes.
    parser.add_argument("--role", choices=["main", "fleet", "watch", "load"], default="main")
    parser.add_argument("--controller", help=argparse.SUPPRESS)
    parser.add_argument("--registered", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--fleet-port", type=int, default=0, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.role == "fleet":
        raise_open_files_limit()
        asyncio.run(serve_fleet())
        return 0
    if args.role == "watch":
        raise_open_files_limit()
        asyncio.run(watch_controller(args.controller, args.registered))
        return 0
    if args.role == "load":
        figures = asyncio.run(
            generate_load(
                args.controller,
                args.seconds,
                args.concurrency,
                args.registered,
                args.fleet_port,
                args.heartbeat_interval,
            )
        )
        print(json.dumps(figures))
        return 0
    steps = asyncio.run(run(args))
    if args.json:
        with open(args.json, "w") as out:
            json.dump([asdict(step) for step in steps], out, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
