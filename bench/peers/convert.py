"""The default model's GGUF as an HF folder for vLLM (which serves HF folders): the same weights,
dequantized by transformers to float32 exactly as the worker loads them, plus the tokenizer
converted from the GGUF's vocabulary. Kept in a cache keyed by the file, so it is written once.

    .venv/bin/python -m bench.peers.convert     # prints the folder
"""

from __future__ import annotations

import hashlib
import shutil
import sys
from pathlib import Path


def hf_model_dir(gguf: Path, cache_root: Path) -> Path:
    """The converted folder for gguf under cache_root, written first when missing."""
    import transformers

    stat = gguf.stat()
    key = f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:{transformers.__version__}"
    target = cache_root / f"{gguf.stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # transformers marks a model read from a GGUF as "quantized with gguf" and refuses to save it;
    # its weights are plain float32 tensors by now, so drop the mark.
    for attribute, value in (("hf_quantizer", None), ("is_quantized", False)):
        setattr(model, attribute, value)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    staging.rename(target)
    return target


def main() -> int:
    from bench.peers import DEFAULT_HF_CACHE
    from bench.serving import default_chat_model_path

    print(hf_model_dir(Path(default_chat_model_path()), DEFAULT_HF_CACHE))
    return 0


if __name__ == "__main__":
    sys.exit(main())
