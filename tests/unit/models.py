"""Tiny models for unit tests: real tokenizers built in memory and random transformers models,
saved with save_pretrained so tests go through the real loading path. Each builds in well under
a second."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (
    BertConfig,
    BertModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? The capital of France is Paris.",
    "Hello, world! Hello again; hello there.",
    "Café crème brûlée naïve façade jalapeño über straße.",
    "日本語のテキストと中文文本, 还有한국어 문장.",
    "Emoji: 🙂 🚀 🎉 👍🏽 and symbols € £ ¥ © ™ ∑ ∞.",
    "Numbers 0123456789 and punctuation !?.,;:()[]{}<>-_=+*/\\|\"'`~^%$#@&",
    "Stop here STOP there, the end is near. END. The end.",
    "assistant user system: you are a helpful assistant.",
]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
BPE_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
BPE_EOS_ID = 2


def build_byte_level_tokenizer(
    vocab_size: int = 512, *, chat_template: bool = True
) -> PreTrainedTokenizerFast:
    """GPT-2/SmolLM2-style byte-level BPE: every byte is a token, so any text round-trips and
    multibyte characters are often split across tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=BPE_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        bos_token="<|im_start|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def build_sentencepiece_tokenizer() -> PreTrainedTokenizerFast:
    """Llama-2-style: "▁" marks spaces, the decoder strips the first one, and characters outside
    the vocabulary fall back to <0xNN> byte tokens."""
    pieces: dict[str, float] = {}
    for line in CORPUS:
        for word in line.split():
            pieces["▁" + word] = -5.0
            for ch in word:
                pieces[ch] = -8.0
    for word in ["▁the", "▁a", "▁of", "▁is", "▁", "he", "llo", "re", "er"]:
        pieces[word] = -4.0
    # Some multibyte characters only exist as bytes.
    for ch in ["日", "🙂", "é", "€"]:
        pieces.pop(ch, None)
        pieces = {k: v for k, v in pieces.items() if ch not in k}
    vocab = [("<unk>", 0.0), ("<s>", 0.0), ("</s>", 0.0)]
    vocab += [(f"<0x{b:02X}>", -10.0) for b in range(256)]
    vocab += list(pieces.items())
    tok = Tokenizer(models.Unigram(vocab, unk_id=0, byte_fallback=True))
    tok.normalizer = normalizers.Sequence(
        [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]  # type: ignore[list-item]
    )
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),  # type: ignore[list-item]
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def save_tiny_llama(
    directory: Path,
    tokenizer: PreTrainedTokenizerFast | None = None,
    *,
    max_positions: int = 256,
    seed: int = 0,
) -> Path:
    """A 2-layer Llama over `tokenizer` (byte-level BPE by default), saved with its tokenizer."""
    tokenizer = tokenizer or build_byte_level_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        # Larger than the default 0.02: peaked random logits, so greedy picks are not near-ties.
        initializer_range=0.3,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def save_tiny_bert(directory: Path, *, max_positions: int = 64, seed: int = 0) -> Path:
    """A 2-layer BERT encoder with a WordPiece tokenizer, saved as a HF folder."""
    words = sorted({w.strip(".,!?;:").lower() for line in CORPUS for w in line.split()} - {""})
    chars = sorted({c for line in CORPUS for c in line.lower() if not c.isspace()})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *words]
    vocab = list(dict.fromkeys(vocab))
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    from tokenizers import processors

    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        special_tokens=[("[CLS]", vocab.index("[CLS]")), ("[SEP]", vocab.index("[SEP]"))],
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=max_positions,
    )
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=max_positions,
    )
    torch.manual_seed(seed)
    BertModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
