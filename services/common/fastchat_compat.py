"""FastChat's command-line habits in chatfleet: its URL-style addresses, its list syntax, and the
flags chatfleet does not implement, which fail with a message saying so and what to do instead."""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn

_INSTEAD = "serve the full-precision model (--quantization int8 on CPU) or a GGUF file"
_GPTQ = f"GPTQ checkpoints are not loaded; {_INSTEAD}"
_AWQ = f"AWQ checkpoints are not loaded; {_INSTEAD}"
_EXLLAMA = "the ExLlamaV2 backend is not available; models run with transformers"
_XFT = "the xFasterTransformer backend is not available; models run with transformers"
_SSL = (
    "FastChat serves this process over HTTPS; chatfleet's controller and workers speak gRPC, "
    "protected by --tls-cert/--tls-key (and --grpc-token); the gateway takes --ssl"
)

# FastChat's model_worker / multi_model_worker flags (fastchat/model/model_adapter.py
# add_model_args and fastchat/serve/model_worker.py) that chatfleet's worker does not implement.
UNSUPPORTED_WORKER_FLAGS: dict[str, str] = {
    "--revision": "models load from local folders and GGUF files, not from a model hub: "
    "download that revision and pass its folder to --model-path",
    "--gpus": "choose the GPU with --device cuda:N (one worker per GPU)",
    "--cpu-offloading": "each model runs whole on one device",
    "--gptq-ckpt": _GPTQ,
    "--gptq-wbits": _GPTQ,
    "--gptq-groupsize": _GPTQ,
    "--gptq-act-order": _GPTQ,
    "--awq-ckpt": _AWQ,
    "--awq-wbits": _AWQ,
    "--awq-groupsize": _AWQ,
    "--enable-exllama": _EXLLAMA,
    "--exllama-max-seq-len": _EXLLAMA,
    "--exllama-gpu-split": _EXLLAMA,
    "--exllama-cache-8bit": _EXLLAMA,
    "--enable-xft": _XFT,
    "--xft-max-seq-len": _XFT,
    "--xft-dtype": _XFT,
    "--conv-template": "prompts are rendered with the model's own chat template "
    "(tokenizer_config.json or the GGUF metadata), not FastChat's conversation templates",
    "--stream-interval": "streams carry every token as soon as it is decoded",
    "--debug": "use --log-level DEBUG",
    "--ssl": _SSL,
}

# fastchat/serve/controller.py
UNSUPPORTED_CONTROLLER_FLAGS: dict[str, str] = {"--ssl": _SSL}


class _UnsupportedFlag(argparse.Action):
    """Fails parsing as soon as the flag is met, naming it and saying what to do instead."""

    def __init__(
        self, option_strings: Sequence[str], dest: str, reason: str, **kwargs: Any
    ) -> None:
        # nargs="?": `--gptq-wbits 4` and `--enable-xft` both reach this action (not argparse's
        # generic "unrecognized arguments").
        super().__init__(option_strings, dest, nargs="?", help=argparse.SUPPRESS, **kwargs)
        self.reason = reason

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> NoReturn:
        parser.error(
            f"{option_string} is a FastChat flag that chatfleet does not support: {self.reason}"
        )


def add_unsupported_flags(parser: argparse.ArgumentParser, flags: Mapping[str, str]) -> None:
    """Declare FastChat's flags that chatfleet lacks, hidden from --help, each failing with its
    reason when used."""
    for flag, reason in flags.items():
        parser.add_argument(
            flag,
            action=_UnsupportedFlag,
            reason=reason,
            dest=f"unsupported_{flag.lstrip('-').replace('-', '_')}",
            default=argparse.SUPPRESS,
        )


class BadValueError(argparse.ArgumentTypeError, ValueError):
    """A flag value that does not parse: argparse shows its message as is, and FlagParser's
    environment fallback (which catches ValueError) too."""


_SCHEME = re.compile(r"^[a-z][a-z0-9+.-]*://", re.IGNORECASE)


def host_port(address: str) -> str:
    """`http://localhost:21001/` (FastChat's form) -> `localhost:21001` (a gRPC target)."""
    stripped = _SCHEME.sub("", address.strip(), count=1)
    return stripped.rstrip("/")


def parse_list(text: str) -> list[str]:
    """A list flag's value: FastChat's JSON (`'["http://a", "http://b"]'`) or comma-separated."""
    stripped = text.strip()
    if stripped.startswith("["):
        try:
            items = json.loads(stripped)
        except json.JSONDecodeError as error:
            raise BadValueError(f"not a JSON list of strings: {text!r} ({error})") from None
        if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
            raise BadValueError(f"not a JSON list of strings: {text!r}")
        return [item.strip() for item in items if item.strip()]
    return [item.strip() for item in stripped.split(",") if item.strip()]


_MEMORY = re.compile(r"\d+(\.\d+)?\s*([KMGT]i?B)?", re.IGNORECASE)


def parse_memory(text: str) -> str:
    """FastChat's --max-gpu-memory value, e.g. `13GiB` or `13Gib`; BadValueError otherwise."""
    stripped = text.strip()
    if not _MEMORY.fullmatch(stripped):
        raise BadValueError(f"expected an amount such as 13GiB, got {text!r}")
    return stripped
