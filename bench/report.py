"""What a benchmark run concludes: the targets of the continuous-batching issue, the printed tables,
and the JSON and PNG files under bench/results/."""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from rich.console import Console
from rich.table import Table

from bench.baselines import STATIC_BATCH_SIZE, Baselines
from bench.metrics import LevelMetrics, StructuredLevel
from bench.multiturn import MultiTurnLevel

# The targets, in one place so they are easy to review and to tighten.
SINGLE_VS_HF = 0.9  # served single-stream tok/s >= this x HF generate single stream
BATCHING_GAIN = 6.0  # tok/s at 16 concurrent >= this x served single stream
VS_STATIC_BATCH = 0.9  # tok/s at 16 concurrent >= this x HF generate on a static batch of 16
TTFT_P50_AT_16_MS = 1000.0  # TTFT p50 at 16 concurrent <= this
HOLDS_AT_32 = 0.95  # tok/s at 32 >= this x tok/s at 16 ("holds or rises", allowing 5% noise)
MASK_OF_STEP = 0.15  # structured output: grammar-mask seconds < this x engine-step seconds
# Issue 16, against the peers measured in the same run (bench/peers):
SINGLE_VS_LLAMACPP = 0.75  # tok/s at 1 >= this x llama.cpp server's tok/s at 1
VS_VLLM = 1.0  # tok/s at 16 and at 32 >= this x vLLM CPU's at the same level
VS_LLAMACPP = 1.5  # tok/s at 16 and at 32 >= this x llama.cpp server's (parallel slots)
MULTITURN_GROWTH = 2.0  # multi-turn, prefix caching on: TTFT p50 at the last turn <= this x turn 1

Status = Literal["PASS", "FAIL", "SKIP"]


@dataclass(frozen=True)
class TargetResult:
    name: str
    goal: str  # the rule in words
    measured: float | None
    threshold: float | None
    status: Status
    note: str = ""


def _at_least(name: str, goal: str, measured: float, threshold: float) -> TargetResult:
    status: Status = "PASS" if measured >= threshold else "FAIL"
    return TargetResult(
        name, goal, measured, threshold, status, f"{measured / threshold:.2f}x goal"
    )


def _skip(name: str, goal: str, why: str) -> TargetResult:
    return TargetResult(name, goal, None, None, "SKIP", why)


def evaluate_targets(
    levels: Mapping[int, LevelMetrics], baselines: Baselines | None
) -> list[TargetResult]:
    """PASS, FAIL or SKIP (a level or the baselines were not run) for every target."""
    results = []
    errors = sum(level.errors for level in levels.values())
    results.append(
        TargetResult(
            "no errors",
            "every request completes with exactly max_tokens tokens",
            float(errors),
            0.0,
            "PASS" if errors == 0 else "FAIL",
            f"{errors} failed request(s)",
        )
    )
    single, at16, at32 = levels.get(1), levels.get(16), levels.get(32)

    goal = f"tok/s at 1 >= {SINGLE_VS_HF:g}x HF generate single stream"
    if single is None or baselines is None:
        results.append(_skip("single stream", goal, "needs level 1 and the baselines"))
    else:
        results.append(
            _at_least(
                "single stream", goal, single.output_throughput,
                SINGLE_VS_HF * baselines.single_tok_s,
            )
        )  # fmt: skip

    goal = f"tok/s at 16 >= {BATCHING_GAIN:g}x served tok/s at 1"
    if single is None or at16 is None:
        results.append(_skip("batching gain", goal, "needs levels 1 and 16"))
    else:
        results.append(
            _at_least(
                "batching gain", goal, at16.output_throughput,
                BATCHING_GAIN * single.output_throughput,
            )
        )  # fmt: skip

    goal = f"tok/s at 16 >= {VS_STATIC_BATCH:g}x HF generate static batch of {STATIC_BATCH_SIZE}"
    if at16 is None or baselines is None:
        results.append(_skip("vs static batch", goal, "needs level 16 and the baselines"))
    else:
        results.append(
            _at_least(
                "vs static batch", goal, at16.output_throughput,
                VS_STATIC_BATCH * baselines.batch_tok_s,
            )
        )  # fmt: skip

    goal = f"TTFT p50 at 16 <= {TTFT_P50_AT_16_MS:g} ms"
    if at16 is None or at16.ttft.p50_ms is None:
        results.append(_skip("TTFT under load", goal, "needs level 16"))
    else:
        ttft = at16.ttft.p50_ms
        results.append(
            TargetResult(
                "TTFT under load", goal, ttft, TTFT_P50_AT_16_MS,
                "PASS" if ttft <= TTFT_P50_AT_16_MS else "FAIL",
                f"{ttft / TTFT_P50_AT_16_MS:.2f}x limit",
            )
        )  # fmt: skip

    goal = f"tok/s at 32 >= {HOLDS_AT_32:g}x tok/s at 16 (holds or rises)"
    if at16 is None or at32 is None:
        results.append(_skip("holds at 32", goal, "needs levels 16 and 32"))
    else:
        results.append(
            _at_least(
                "holds at 32", goal, at32.output_throughput, HOLDS_AT_32 * at16.output_throughput
            )
        )
    return results


def evaluate_structured_targets(structured: StructuredLevel | None) -> list[TargetResult]:
    """The structured-output level's verdicts: no failed request in either run, and the grammar
    mask under MASK_OF_STEP of the engine's step time (SKIP when the level did not run or the
    worker's counters could not be read)."""
    name = "structured mask"
    goal = f"grammar mask < {MASK_OF_STEP:.0%} of engine step time at the structured level"
    if structured is None:
        return [_skip(name, goal, "the structured level was not run")]
    errors = structured.unconstrained.errors + structured.constrained.errors
    results = [
        TargetResult(
            "structured no errors",
            "every structured-level request (constrained and not) completes",
            float(errors),
            0.0,
            "PASS" if errors == 0 else "FAIL",
            f"{errors} failed request(s)",
        )
    ]
    fraction = structured.mask_fraction
    if fraction is None:
        results.append(_skip(name, goal, "no mask/step counters from the worker"))
    else:
        results.append(
            TargetResult(
                name, goal, fraction, MASK_OF_STEP,
                "PASS" if fraction < MASK_OF_STEP else "FAIL",
                f"{fraction:.1%} of a step",
            )
        )  # fmt: skip
    return results


def evaluate_peer_targets(
    levels: Mapping[int, LevelMetrics], peers: Mapping[str, Mapping[int, LevelMetrics]]
) -> list[TargetResult]:
    """chatfleet's tok/s against each peer's at the same level of the same run: single stream vs
    llama.cpp, 16 and 32 streams vs vLLM and llama.cpp. SKIP where a side was not measured or
    had failed requests (a ratio over an incomplete level means nothing)."""
    rules = (
        ("llamacpp", "llama.cpp server", 1, SINGLE_VS_LLAMACPP),
        ("vllm", "vLLM CPU", 16, VS_VLLM),
        ("vllm", "vLLM CPU", 32, VS_VLLM),
        ("llamacpp", "llama.cpp server", 16, VS_LLAMACPP),
        ("llamacpp", "llama.cpp server", 32, VS_LLAMACPP),
    )
    results = []
    for peer, label, concurrency, factor in rules:
        name = f"vs {label} at {concurrency}"
        goal = f"tok/s at {concurrency} >= {factor:g}x {label}'s at {concurrency}, same run"
        ours, theirs = levels.get(concurrency), peers.get(peer, {}).get(concurrency)
        if ours is None or theirs is None:
            results.append(_skip(name, goal, f"needs level {concurrency} on chatfleet and {label}"))
        elif ours.errors or theirs.errors or not theirs.output_throughput:
            results.append(_skip(name, goal, "failed requests at that level"))
        else:
            results.append(
                _at_least(name, goal, ours.output_throughput, factor * theirs.output_throughput)
            )
    return results


def evaluate_multiturn_targets(runs: Sequence[MultiTurnLevel]) -> list[TargetResult]:
    """The multi-turn verdict on chatfleet with prefix caching on (the run labelled so); the
    other runs are reported, not judged."""
    name = "multi-turn TTFT"
    run = next((r for r in runs if r.label == MULTITURN_CHATFLEET_ON), None)
    goal = f"TTFT p50 at the last turn <= {MULTITURN_GROWTH:g}x turn 1, prefix caching on"
    if run is None:
        return [_skip(name, goal, "the multi-turn level was not run on chatfleet")]
    if run.errors:
        return [
            TargetResult(name, goal, float(run.errors), 0.0, "FAIL", f"{run.errors} failed turn(s)")
        ]
    growth = run.ttft_growth
    if growth is None:
        return [_skip(name, goal, "no TTFT for the first or the last turn")]
    return [
        TargetResult(
            name, goal, growth, MULTITURN_GROWTH,
            "PASS" if growth <= MULTITURN_GROWTH else "FAIL",
            f"turn {run.turns} / turn 1 = {growth:.2f}x",
        )
    ]  # fmt: skip


MULTITURN_CHATFLEET_ON = "chatfleet, prefix caching on"
MULTITURN_CHATFLEET_OFF = "chatfleet, prefix caching off"


# --- printing -------------------------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _ratio(value: float, base: float | None) -> str:
    return "-" if not base else f"{value / base:.2f}x"


def print_report(
    console: Console,
    levels: Sequence[LevelMetrics],
    baselines: Baselines | None,
    targets: Sequence[TargetResult],
) -> None:
    served = Table(title="Served through the gateway (/v1/completions, streaming)")
    for column in (
        "C", "reqs", "err", "tok/s", "req/s", "vs HF 1", f"vs HF b{STATIC_BATCH_SIZE}",
        "TTFT p50/p99 ms", "ITL p50/p99 ms", "TPOT p50/p99 ms", "E2E p50/p99 s",
    ):  # fmt: skip
        served.add_column(column, justify="right")
    single_tok_s = baselines.single_tok_s if baselines else None
    batch_tok_s = baselines.batch_tok_s if baselines else None
    for level in levels:
        e2e_p50 = None if level.e2e.p50_ms is None else level.e2e.p50_ms / 1000
        e2e_p99 = None if level.e2e.p99_ms is None else level.e2e.p99_ms / 1000
        served.add_row(
            str(level.concurrency),
            str(level.requests),
            str(level.errors) if not level.errors else f"[red]{level.errors}[/red]",
            _fmt(level.output_throughput),
            _fmt(level.request_throughput, 2),
            _ratio(level.output_throughput, single_tok_s),
            _ratio(level.output_throughput, batch_tok_s),
            f"{_fmt(level.ttft.p50_ms, 0)} / {_fmt(level.ttft.p99_ms, 0)}",
            f"{_fmt(level.itl.p50_ms)} / {_fmt(level.itl.p99_ms)}",
            f"{_fmt(level.tpot.p50_ms)} / {_fmt(level.tpot.p99_ms)}",
            f"{_fmt(e2e_p50, 2)} / {_fmt(e2e_p99, 2)}",
        )
    console.print(served)
    for level in levels:
        for sample in level.error_samples:
            console.print(f"[red]errors at concurrency {level.concurrency}:[/red] {sample}")

    if baselines is not None:
        base = Table(title="In-process baselines (HF model.generate, greedy, same output length)")
        for column in ("run", "requests", "seconds", "tok/s"):
            base.add_column(column, justify="right")
        base.add_row(
            "single stream",
            str(baselines.single_requests),
            _fmt(baselines.single_seconds, 2),
            _fmt(baselines.single_tok_s),
        )
        base.add_row(
            f"static batch of {baselines.batch_size} (left-padded)",
            str(baselines.batch_size),
            _fmt(baselines.batch_seconds, 2),
            _fmt(baselines.batch_tok_s),
        )
        console.print(base)
    print_targets(console, targets)


def print_structured_report(console: Console, structured: StructuredLevel) -> None:
    table = Table(
        title=f"Structured output at {structured.concurrency} concurrent "
        "(/v1/chat/completions, streaming, same prompts and max_tokens)"
    )
    for column in (
        "run", "reqs", "err", "tok/s", "mean out tok", "TTFT p50 ms", "ITL p50 ms", "valid JSON",
    ):  # fmt: skip
        table.add_column(column, justify="right")
    for label, level, valid in (
        ("unconstrained", structured.unconstrained, "-"),
        ("json_schema", structured.constrained, f"{structured.valid_outputs}"),
    ):
        mean_out = level.output_tokens / level.completed if level.completed else None
        table.add_row(
            label,
            str(level.requests),
            str(level.errors) if not level.errors else f"[red]{level.errors}[/red]",
            _fmt(level.output_throughput),
            _fmt(mean_out),
            _fmt(level.ttft.p50_ms, 0),
            _fmt(level.itl.p50_ms),
            valid,
        )
    console.print(table)
    for level in (structured.unconstrained, structured.constrained):
        for sample in level.error_samples:
            console.print(f"[red]errors at the structured level:[/red] {sample}")
    ratio = structured.throughput_ratio
    fraction = structured.mask_fraction
    console.print(
        f"json_schema tok/s = {_fmt(ratio, 2) if ratio is not None else '-'}x unconstrained; "
        f"mask {_fmt(structured.mask_seconds, 3)} s over {_fmt(structured.step_seconds, 3)} s of "
        f"engine steps = {'-' if fraction is None else f'{fraction:.1%}'}"
    )


def peer_ratio(ours: LevelMetrics | None, theirs: LevelMetrics | None) -> float | None:
    """chatfleet's tok/s over a peer's at one level; None when either is missing or zero."""
    if ours is None or theirs is None or not theirs.output_throughput:
        return None
    return ours.output_throughput / theirs.output_throughput


def print_peer_report(
    console: Console,
    levels: Mapping[int, LevelMetrics],
    peers: Mapping[str, Mapping[int, LevelMetrics]],
    labels: Mapping[str, str],
) -> None:
    """One row per level: chatfleet's tok/s and TTFT p50 and each peer's, with chatfleet / peer."""
    table = Table(title="Against the peers, same run (/v1/completions, same prompts and tokens)")
    table.add_column("C", justify="right")
    table.add_column("chatfleet tok/s", justify="right")
    table.add_column("TTFT p50 ms", justify="right")
    for peer in peers:
        table.add_column(f"{labels[peer]} tok/s", justify="right")
        table.add_column("TTFT p50 ms", justify="right")
        table.add_column("chatfleet / it", justify="right")
    concurrencies = sorted({c for measured in peers.values() for c in measured})
    for concurrency in concurrencies:
        ours = levels.get(concurrency)
        row = [
            str(concurrency),
            _fmt(ours.output_throughput) if ours else "-",
            _fmt(ours.ttft.p50_ms, 0) if ours else "-",
        ]
        for measured in peers.values():
            theirs = measured.get(concurrency)
            ratio = peer_ratio(ours, theirs)
            row += [
                _fmt(theirs.output_throughput) if theirs else "-",
                _fmt(theirs.ttft.p50_ms, 0) if theirs else "-",
                "-" if ratio is None else f"{ratio:.2f}x",
            ]
        table.add_row(*row)
    console.print(table)
    for peer, measured in peers.items():
        for level in measured.values():
            for sample in level.error_samples:
                console.print(
                    f"[red]{labels[peer]} errors at concurrency {level.concurrency}:[/red] {sample}"
                )


def print_multiturn_report(console: Console, runs: Sequence[MultiTurnLevel]) -> None:
    """TTFT p50 per turn for every run, then the last turn over the first."""
    if not runs:
        return
    turns = max(run.turns for run in runs)
    first = runs[0]
    table = Table(
        title=f"Multi-turn: {first.users} conversations x {turns} turns, whole history resent "
        f"each turn, {first.max_tokens} tokens per answer (/v1/chat/completions)"
    )
    table.add_column("turn", justify="right")
    table.add_column("prompt tok", justify="right")
    for run in runs:
        table.add_column(f"{run.label}: TTFT p50 ms", justify="right")
        table.add_column("cached tok", justify="right")
    for index in range(turns):
        prompt = next(
            (
                r.turn_metrics[index].mean_prompt_tokens
                for r in runs
                if len(r.turn_metrics) > index
                and r.turn_metrics[index].mean_prompt_tokens is not None
            ),
            None,
        )
        row = [str(index + 1), _fmt(prompt, 0)]
        for run in runs:
            turn = run.turn_metrics[index] if len(run.turn_metrics) > index else None
            row += [
                _fmt(turn.ttft_p50_ms, 0) if turn else "-",
                _fmt(turn.mean_cached_tokens, 0) if turn else "-",
            ]
        table.add_row(*row)
    console.print(table)
    for run in runs:
        growth = run.ttft_growth
        console.print(
            f"{run.label}: turn {run.turns} / turn 1 TTFT p50 = "
            f"{'-' if growth is None else f'{growth:.2f}x'}, {run.output_throughput:.1f} tok/s, "
            f"{run.errors} failed turn(s)"
        )
        for sample in run.error_samples:
            console.print(f"[red]{run.label} error:[/red] {sample}")


def print_targets(console: Console, targets: Sequence[TargetResult]) -> None:
    colours = {"PASS": "green", "FAIL": "red", "SKIP": "yellow"}
    for target in targets:
        # Fractions (the mask's share of a step) need more digits than tok/s and milliseconds.
        digits = 3 if target.threshold is not None and 0 < target.threshold < 1 else 1
        measured = _fmt(target.measured, digits)
        threshold = _fmt(target.threshold, digits)
        console.print(
            f"[{colours[target.status]}]{target.status}[/] {target.name}: {target.goal} "
            f"(measured {measured}, goal {threshold}; {target.note})"
        )


# --- files ----------------------------------------------------------------------------------------


def to_jsonable(value: Any) -> Any:
    """Dataclasses (nested), paths and tuples as plain JSON values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def write_json(
    output_dir: Path, stamp: str, document: Mapping[str, Any], latest: str = "latest"
) -> Path:
    """<stamp>.json and a copy as <latest>.json."""
    path = output_dir / f"{stamp}.json"
    path.write_text(json.dumps(to_jsonable(document), indent=2) + "\n")
    shutil.copyfile(path, output_dir / f"{latest}.json")
    return path


def write_plot(
    output_dir: Path,
    stamp: str,
    levels: Sequence[LevelMetrics],
    baselines: Baselines | None,
    title: str,
) -> Path:
    """Throughput and TTFT against concurrency, two panels, baselines and targets as lines;
    <stamp>.png and a copy as latest.png."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    concurrency = [level.concurrency for level in levels]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5.6))
    left.plot(
        concurrency, [lv.output_throughput for lv in levels], "o-", label="served (output tok/s)"
    )
    single = next((lv for lv in levels if lv.concurrency == 1), None)
    if baselines is not None:
        left.axhline(baselines.single_tok_s, ls="--", c="grey", label="HF generate, single stream")
        left.axhline(
            baselines.batch_tok_s, ls=":", c="black",
            label=f"HF generate, static batch of {baselines.batch_size}",
        )  # fmt: skip
        left.axhline(
            VS_STATIC_BATCH * baselines.batch_tok_s, ls=":", c="tab:red",
            label=f"target at 16: {VS_STATIC_BATCH:g}x static batch",
        )  # fmt: skip
    if single is not None:
        left.axhline(
            BATCHING_GAIN * single.output_throughput, ls="-.", c="tab:orange",
            label=f"target at 16: {BATCHING_GAIN:g}x served single stream",
        )  # fmt: skip
    left.set_ylabel("output tokens/s")
    left.set_title("Throughput")

    right.plot(concurrency, [lv.ttft.p50_ms or 0.0 for lv in levels], "o-", label="TTFT p50")
    right.plot(concurrency, [lv.ttft.p99_ms or 0.0 for lv in levels], "x--", label="TTFT p99")
    right.axhline(TTFT_P50_AT_16_MS, ls=":", c="tab:red", label="target p50 at 16")
    right.set_ylabel("ms")
    right.set_title("Time to first token")
    for axis in (left, right):
        axis.set_xscale("log", base=2)
        axis.set_xticks(concurrency, [str(c) for c in concurrency])
        axis.minorticks_off()
        axis.set_xlabel("concurrent clients")
        axis.set_ylim(bottom=0)
        axis.grid(True, alpha=0.3)
        # Below the panel: the target lines run across the whole plot, a legend inside hides them.
        axis.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = output_dir / f"{stamp}.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    shutil.copyfile(path, output_dir / "latest.png")
    return path
