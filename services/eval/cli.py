"""`chatfleet eval mt-bench`: MT-bench over the fleet, judged by an LLM (FastChat's llm_judge)."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Mapping

from rich.console import Console
from rich.markup import escape

from services.cli.main import new_parser
from services.eval.config import ConfigError, add_flags, config_from_args
from services.eval.errors import EvalError
from services.eval.mtbench import run_mt_bench

BENCHMARKS = {"mt-bench": "MT-bench's 80 two-turn questions, graded by an LLM judge"}
USAGE = "usage: chatfleet eval BENCHMARK [options]\n\nbenchmarks:\n" + "\n".join(
    f"  {name:<10} {text}" for name, text in BENCHMARKS.items()
)


def main(argv: list[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in {"-h", "--help", "help"}:
        print(USAGE)
        return 0 if args else 2
    if args[0] not in BENCHMARKS:
        print(f"chatfleet eval: unknown benchmark {args[0]!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    env = os.environ if environ is None else environ
    parser, flags = new_parser(
        "eval mt-bench",
        "Answer MT-bench with every served chat model (or --models) through the gateway, grade the "
        "answers with an LLM judge (the gateway's first chat model unless --judge-url/--judge-"
        "model say otherwise) and print the scores. Files follow FastChat's llm_judge layout, so "
        "its show_result.py reads them; a rerun resumes where the last one stopped.",
        env,
    )
    add_flags(flags)
    ns = parser.parse_args(args[1:])
    try:
        config = config_from_args(ns, env)
    except ConfigError as error:
        parser.error(str(error))
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    out = Console()
    errors = Console(stderr=True)
    try:
        asyncio.run(run_mt_bench(config, out, errors))
    except EvalError as error:
        errors.print(f"[bold red]error:[/bold red] {escape(str(error))}", soft_wrap=True)
        return 1
    except KeyboardInterrupt:
        errors.print(f"interrupted: what finished is kept in {config.output_dir}; rerun to resume")
        return 130
    return 0
