"""Helpers to declare command-line flags that fall back to CHATFLEET_* environment variables."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

ENV_PREFIX = "CHATFLEET_"


def env_name(flag: str) -> str:
    """`--controller-address` -> `CHATFLEET_CONTROLLER_ADDRESS`."""
    return ENV_PREFIX + flag.lstrip("-").replace("-", "_").upper()


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off", ""}:
        return False
    raise ValueError(f"not a boolean: {text!r}")


class FlagParser:
    """An argparse parser whose flags read their default from the environment.

    The environment is passed in (never read at import), so tests can build configs from dicts.
    """

    def __init__(
        self, parser: argparse.ArgumentParser, environ: Mapping[str, str] | None = None
    ) -> None:
        self.parser = parser
        self.environ = os.environ if environ is None else environ

    def add(
        self,
        *flags: str,
        default: Any = None,
        type: Callable[[str], Any] = str,
        help: str,
        env: str | None = None,
        nargs: str | None = None,
        choices: Sequence[Any] | None = None,
        metavar: str | None = None,
    ) -> None:
        """Add a flag whose default comes from `env` (derived from the first flag if not given)."""
        var = env or env_name(flags[0])
        raw = self.environ.get(var)
        value = default
        if raw is not None:
            try:
                value = raw.split(",") if nargs in ("*", "+") else type(raw)
                if nargs in ("*", "+"):
                    value = [type(item) for item in value if item.strip()]
            except ValueError as exc:
                self.parser.error(f"environment variable {var}={raw!r}: {exc}")
        kwargs: dict[str, Any] = {
            "default": value,
            "type": type,
            "help": f"{help} (env {var}; default: {default!r})",
        }
        if nargs is not None:
            kwargs["nargs"] = nargs
        if choices is not None:
            kwargs["choices"] = choices
        if metavar is not None:
            kwargs["metavar"] = metavar
        self.parser.add_argument(*flags, **kwargs)

    def add_bool(
        self, *flags: str, default: bool = False, help: str, env: str | None = None
    ) -> None:
        """Add an on/off flag (`--x` / `--no-x`) whose default may come from the environment."""
        var = env or env_name(flags[0])
        raw = self.environ.get(var)
        value = default
        if raw is not None:
            try:
                value = _parse_bool(raw)
            except ValueError as exc:
                self.parser.error(f"environment variable {var}: {exc}")
        self.parser.add_argument(
            *flags,
            default=value,
            action=argparse.BooleanOptionalAction,
            help=f"{help} (env {var}; default: {default!r})",
        )


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LOG_FORMATS = ("text", "json")


def add_logging_flags(flags: FlagParser, *, level: str = "INFO", fmt: str = "text") -> None:
    """--log-level and --log-format, the same for every service."""
    flags.add(
        "--log-level", default=level, type=str.upper, choices=LOG_LEVELS, help="logging level"
    )
    flags.add("--log-format", default=fmt, choices=LOG_FORMATS, help="log format")
