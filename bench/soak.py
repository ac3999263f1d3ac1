"""`make soak`: N minutes of mixed load with faults injected against a stack with two workers, then
a report of the requests served, the errors by kind and the memory (RSS) of every process.

The stack is tests/chaos/fleet.py's (controller, two chat-only workers, gateway; gRPC token and API
key on). Clients loop over streamed and plain chat completions, some hanging up mid-stream on
purpose, and model listings. Faults come in turn every --fault-interval seconds: a worker SIGKILLed
then started again, a worker drained by SIGTERM then started again, the controller restarted
(SIGTERM) or killed (SIGKILL) and started again, and a burst of ten times the fleet's capacity.

    .venv/bin/python -m bench.soak [--minutes 5] [--clients 6] [--fault-interval 30]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import random
import signal
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from services.common.config import FlagParser
from tests.chaos.fleet import Fleet
from tests.chaos.traffic import Outcome, chat

RESULTS_DIR = Path(__file__).resolve().parent / "results"
# Per worker: --max-batch-size 8 running plus --max-queue 2 waiting (tests/chaos/fleet.py).
WORKER_CAPACITY = 8 + 2
RSS_SAMPLE_INTERVAL_S = 5.0
# Outcomes that a fault explains: a worker killed under a request that had already produced text
# (stream error or 503), requests refused while every worker was full (429).
EXPECTED_UNDER_FAULTS = {"ok", "disconnected", "http_429", "http_503", "stream_error"}


@dataclass(frozen=True)
class SoakConfig:
    minutes: float
    clients: int
    fault_interval: float
    seed: int
    output_dir: Path


@dataclass
class RssSeries:
    """RSS samples of one process incarnation (a role may have several: restarts)."""

    role: str
    pid: int
    samples: list[tuple[float, int]] = field(default_factory=list)  # (seconds since start, KiB)
    # When it was serving (a restarted worker loads its model first): growth is counted from the
    # first sample taken since.
    serving_since: float | None = None

    def summary(self) -> dict[str, Any]:
        since = self.serving_since if self.serving_since is not None else self.samples[-1][0]
        serving = [sample for sample in self.samples if sample[0] >= since] or self.samples[-1:]
        first, last = serving[0][1], serving[-1][1]
        return {
            "role": self.role,
            "pid": self.pid,
            "serving_s": round(serving[-1][0] - serving[0][0], 1),
            "first_mib": round(first / 1024, 1),
            "last_mib": round(last / 1024, 1),
            "peak_mib": round(max(kib for _, kib in self.samples) / 1024, 1),
            "growth_mib": round((last - first) / 1024, 1),
        }


@dataclass
class SoakState:
    started: float = field(default_factory=time.monotonic)
    outcomes: Counter[str] = field(default_factory=Counter)
    by_route: Counter[str] = field(default_factory=Counter)
    faults: list[dict[str, Any]] = field(default_factory=list)
    rss: dict[int, RssSeries] = field(default_factory=dict)
    examples: dict[str, str] = field(default_factory=dict)

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def record(self, route: str, outcome: Outcome) -> None:
        self.outcomes[outcome.kind] += 1
        self.by_route[f"{route} {outcome.kind}"] += 1
        if outcome.kind not in ("ok", "disconnected") and outcome.kind not in self.examples:
            self.examples[outcome.kind] = json.dumps(outcome.error)[:300]


def _rss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


async def _sample_rss(fleet: Fleet, state: SoakState, stop: asyncio.Event) -> None:
    while True:
        _sample_once(fleet, state)
        try:
            await asyncio.wait_for(stop.wait(), RSS_SAMPLE_INTERVAL_S)
            return
        except TimeoutError:
            continue


def _sample_once(fleet: Fleet, state: SoakState) -> None:
    now = state.elapsed()
    for role, pid in fleet.pids().items():
        kib = _rss_kib(pid)
        if kib is not None:
            state.rss.setdefault(pid, RssSeries(role, pid)).samples.append((now, kib))


def _mark_serving(fleet: Fleet, state: SoakState) -> None:
    """Note that every process alive now serves (called once the fleet is whole)."""
    _sample_once(fleet, state)
    for pid in fleet.pids().values():
        series = state.rss.get(pid)
        if series is not None and series.serving_since is None:
            series.serving_since = series.samples[-1][0]


# --- load -----------------------------------------------------------------------------------------


async def _client_loop(
    client: httpx.AsyncClient, state: SoakState, stop: asyncio.Event, rng: random.Random
) -> None:
    while not stop.is_set():
        roll = rng.random()
        prompt = f"Write about topic {rng.randrange(1000)}."
        if roll < 0.40:
            route = "chat-stream"
            outcome = await chat(client, prompt, max_tokens=rng.randint(8, 64), stream=True)
        elif roll < 0.75:
            route = "chat"
            outcome = await chat(client, prompt, max_tokens=rng.randint(8, 32), stream=False)
        elif roll < 0.95:
            route = "chat-hang-up"
            outcome = await chat(
                client, prompt, max_tokens=200, stream=True, hang_up_after=rng.randint(1, 4)
            )
        else:
            route = "models"
            outcome = await _list_models(client)
        state.record(route, outcome)


async def _list_models(client: httpx.AsyncClient) -> Outcome:
    try:
        response = await client.get("/v1/models")
    except httpx.TransportError as error:
        return Outcome(kind="transport", error={"message": repr(error)})
    if response.status_code == 200:
        return Outcome(kind="ok", status=200)
    return Outcome(kind=f"http_{response.status_code}", status=response.status_code)


# --- faults ---------------------------------------------------------------------------------------


async def _busiest_worker(fleet: Fleet, rng: random.Random) -> int:
    """The worker with the most requests in flight (ties broken at random): the fault that hurts."""
    loads = await fleet.loads()
    busy = [load.running + load.waiting if load else -1 for load in loads]
    return rng.choice([i for i, n in enumerate(busy) if n == max(busy)])


async def _kill_worker(fleet: Fleet, rng: random.Random) -> dict[str, Any]:
    index = await _busiest_worker(fleet, rng)
    fleet.kill_worker(index)
    code = await fleet.wait_exit(index, 30)
    await fleet.start_worker(index)
    return {"fault": "worker SIGKILL + start", "worker": index, "exit": code}


async def _drain_worker(fleet: Fleet, rng: random.Random) -> dict[str, Any]:
    index = await _busiest_worker(fleet, rng)
    fleet.worker(index).signal(signal.SIGTERM)
    code = await fleet.wait_exit(index, 120)
    await fleet.start_worker(index)
    return {"fault": "worker SIGTERM (drain) + start", "worker": index, "exit": code}


async def _restart_controller(fleet: Fleet, rng: random.Random) -> dict[str, Any]:
    code = await fleet.restart_controller(signal.SIGTERM)
    return {"fault": "controller SIGTERM + start", "exit": code}


async def _kill_controller(fleet: Fleet, rng: random.Random) -> dict[str, Any]:
    code = await fleet.restart_controller(signal.SIGKILL)
    return {"fault": "controller SIGKILL + start", "exit": code}


def _burst(client: httpx.AsyncClient, state: SoakState) -> Fault:
    async def burst(fleet: Fleet, rng: random.Random) -> dict[str, Any]:
        offered = 10 * WORKER_CAPACITY * len(fleet.workers)
        outcomes = await asyncio.gather(
            *(
                chat(client, f"Count to {i}.", max_tokens=16, stream=i % 2 == 0)
                for i in range(offered)
            )
        )
        for outcome in outcomes:
            state.record("burst", outcome)
        kinds = Counter(outcome.kind for outcome in outcomes)
        return {"fault": f"burst of {offered} requests (10x capacity)", "outcomes": dict(kinds)}

    return burst


Fault = Callable[[Fleet, random.Random], Awaitable[dict[str, Any]]]


async def _fault_loop(
    fleet: Fleet,
    faults: Sequence[Fault],
    state: SoakState,
    stop: asyncio.Event,
    interval: float,
    rng: random.Random,
) -> None:
    for turn in range(1_000_000):
        try:
            await asyncio.wait_for(stop.wait(), interval)
            return
        except TimeoutError:
            pass
        fault = faults[turn % len(faults)]
        began = state.elapsed()
        print(f"[{began:6.0f} s] fault: {fault.__name__.strip('_')}", flush=True)
        record = await fault(fleet, rng)
        await fleet.wait_workers_serving(120)
        _mark_serving(fleet, state)
        record.update(at_s=round(began, 1), recovered_s=round(state.elapsed() - began, 1))
        state.faults.append(record)
        print(f"[{state.elapsed():6.0f} s]   {record}", flush=True)


# --- the run --------------------------------------------------------------------------------------


async def soak(config: SoakConfig) -> dict[str, Any]:
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    log_dir = config.output_dir / "logs" / f"soak-{stamp}"
    log_dir.mkdir(parents=True, exist_ok=True)
    fleet = Fleet.create(log_dir)
    rng = random.Random(config.seed)
    print(f"starting the stack (logs in {log_dir})...", flush=True)
    try:
        await fleet.start()
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        async with httpx.AsyncClient(
            base_url=fleet.gateway_url, headers=fleet.headers, timeout=300, limits=limits
        ) as client:
            # Warm up, so the first RSS samples are of processes that have served.
            await asyncio.gather(
                *(chat(client, "Hi.", max_tokens=8, stream=s) for s in (False, True))
            )
            state = SoakState()
            stop = asyncio.Event()
            faults: list[Fault] = [
                _kill_worker,
                _restart_controller,
                _burst(client, state),
                _drain_worker,
                _kill_controller,
            ]
            _mark_serving(fleet, state)
            tasks = [asyncio.create_task(_sample_rss(fleet, state, stop))]
            tasks += [
                asyncio.create_task(_client_loop(client, state, stop, random.Random(rng.random())))
                for _ in range(config.clients)
            ]
            tasks.append(
                asyncio.create_task(
                    _fault_loop(fleet, faults, state, stop, config.fault_interval, rng)
                )
            )
            print(f"soaking for {config.minutes:g} min with {config.clients} clients", flush=True)
            # Until the time is up, or until a task fails (a fault the fleet did not recover from).
            await asyncio.wait(
                tasks, timeout=config.minutes * 60, return_when=asyncio.FIRST_EXCEPTION
            )
            stop.set()  # clients finish their request in flight; a fault under way completes
            await asyncio.gather(*tasks)
            _sample_once(fleet, state)
    except BaseException:
        fleet.dump_logs()
        raise
    finally:
        stopped = await fleet.stop()
    return _report(config, state, stopped, log_dir)


def _report(
    config: SoakConfig,
    state: SoakState,
    stopped: list[tuple[str, int | None]],
    log_dir: Path,
) -> dict[str, Any]:
    total = sum(state.outcomes.values())
    unexpected = {k: v for k, v in state.outcomes.items() if k not in EXPECTED_UNDER_FAULTS}
    return {
        "command": " ".join([Path(sys.executable).name, "-m", "bench.soak", *sys.argv[1:]]),
        "config": {**asdict(config), "output_dir": str(config.output_dir)},
        "seconds": round(state.elapsed(), 1),
        "requests": total,
        "served_ok": state.outcomes["ok"],
        "outcomes": dict(state.outcomes.most_common()),
        "by_route": dict(sorted(state.by_route.items())),
        "unexpected": unexpected,
        "error_examples": state.examples,
        "faults": state.faults,
        "rss": [series.summary() for series in state.rss.values() if series.samples],
        "final_exit_codes": dict(stopped),
        "logs": str(log_dir),
    }


def _print_report(report: dict[str, Any]) -> None:
    print(
        f"\nsoak: {report['seconds']} s, {report['requests']} requests, "
        f"{report['served_ok']} served completely"
    )
    print("outcomes:", ", ".join(f"{k} {v}" for k, v in report["outcomes"].items()))
    print("unexpected:", report["unexpected"] or "none")
    print("faults:")
    for fault in report["faults"]:
        print(f"  {fault}")
    print(
        f"{'process':<12}{'pid':>8}{'serving s':>10}{'first MiB':>11}{'last MiB':>10}"
        f"{'peak MiB':>10}{'growth':>9}"
    )
    for row in report["rss"]:
        print(
            f"{row['role']:<12}{row['pid']:>8}{row['serving_s']:>10}{row['first_mib']:>11}"
            f"{row['last_mib']:>10}{row['peak_mib']:>10}{row['growth_mib']:>9}"
        )
    print("exit codes at the end:", report["final_exit_codes"])


def parse_args(argv: Sequence[str] | None) -> SoakConfig:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__)
    flags = FlagParser(parser, os.environ)
    flags.add(
        "--minutes",
        default=5.0,
        type=float,
        env="CHATFLEET_SOAK_MINUTES",
        help="how long to run the load",
    )
    flags.add(
        "--clients",
        default=6,
        type=int,
        env="CHATFLEET_SOAK_CLIENTS",
        help="closed-loop clients sending requests one after another",
    )
    flags.add(
        "--fault-interval",
        default=30.0,
        type=float,
        env="CHATFLEET_SOAK_FAULT_INTERVAL",
        help="seconds between the end of one fault and the next",
    )
    flags.add(
        "--seed",
        default=0,
        type=int,
        env="CHATFLEET_SOAK_SEED",
        help="seed of the load's and the faults' random choices",
    )
    flags.add(
        "--output-dir",
        default=str(RESULTS_DIR),
        env="CHATFLEET_SOAK_OUTPUT_DIR",
        help="where the JSON report and the processes' logs go",
    )
    ns = parser.parse_args(argv)
    if not ns.minutes > 0 or ns.clients < 1 or not ns.fault_interval > 0:
        parser.error("--minutes and --fault-interval must be > 0, --clients at least 1")
    return SoakConfig(ns.minutes, ns.clients, ns.fault_interval, ns.seed, Path(ns.output_dir))


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_args(argv)
    report = asyncio.run(soak(config))
    _print_report(report)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = config.output_dir / f"soak-{stamp}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"report: {path}")
    return 1 if report["unexpected"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
