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

# The targets, in one place so they are easy to review and to tighten.
SINGLE_VS_HF = 0.9  # served single-stream tok/s >= this x HF generate single stream
BATCHING_GAIN = 6.0  # tok/s at 16 concurrent >= this x served single stream
VS_STATIC_BATCH = 0.9  # tok/s at 16 concurrent >= this x HF generate on a static batch of 16
TTFT_P50_AT_16_MS = 1000.0  # TTFT p50 at 16 concurrent <= this
HOLDS_AT_32 = 0.95  # tok/s at 32 >= this x tok/s at 16 ("holds or rises", allowing 5% noise)
MASK_OF_STEP = 0.15  # structured output: grammar-mask seconds < this x engine-step seconds

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
