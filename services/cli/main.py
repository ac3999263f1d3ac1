"""The `chatfleet` command: run a service, start the whole stack, chat, or send a test message."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import sys
from collections.abc import Mapping

from services.common.config import FlagParser

# Service commands hand their own flags to the service's entry point.
SERVICES = {
    "controller": "services.controller.main",
    "worker": "services.worker.main",
    "gateway": "services.gateway.main",
}

COMMANDS = {
    "up": ("services.cli.up", "start controller, worker and gateway with the default models"),
    "chat": ("services.cli.chat", "chat in the terminal, streaming through the gateway"),
    "test-message": (
        "services.cli.test_message",
        "send one prompt to a model (through the controller) or to a worker, like FastChat's",
    ),
    "eval": ("services.eval.cli", "evaluate the served models: `chatfleet eval mt-bench`"),
}


def _top_level_help() -> str:
    lines = ["usage: chatfleet COMMAND [options]", "", "commands:"]
    for name, module in SERVICES.items():
        lines.append(f"  {name:<13} run the {name} service ({module})")
    for name, (_, text) in COMMANDS.items():
        lines.append(f"  {name:<13} {text}")
    lines += ["", "`chatfleet COMMAND --help` lists a command's flags and CHATFLEET_* variables."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in {"-h", "--help", "help"}:
        print(_top_level_help())
        return 0 if args else 2
    command, rest = args[0], args[1:]
    module_name = SERVICES.get(command) or COMMANDS.get(command, (None, ""))[0]
    if module_name is None:
        print(f"chatfleet: unknown command {command!r}\n\n{_top_level_help()}", file=sys.stderr)
        return 2
    module = importlib.import_module(module_name)
    return int(module.main(rest))


def new_parser(
    prog: str, description: str, environ: Mapping[str, str] | None = None
) -> tuple[argparse.ArgumentParser, FlagParser]:
    """A parser for a CLI command and its env-aware flag helper."""
    parser = argparse.ArgumentParser(prog=f"chatfleet {prog}", description=description)
    return parser, FlagParser(parser, os.environ if environ is None else environ)


def run(coro: object) -> int:
    """Run a command's coroutine; Ctrl-C ends it quietly."""
    try:
        return int(asyncio.run(coro))  # type: ignore[arg-type]
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
