"""Prompt to token ids: plain text, token ids, or chat messages rendered with the tokenizer's chat
template (or a plain `role: content` fallback when the tokenizer has none)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jinja2

from services.common.errors import InvalidRequestError
from services.worker.engine import ChatMessage, Prompt

CHAT_ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class EncodedPrompt:
    token_ids: list[int]
    text: str  # what the ids stand for, for echo
    param: str  # the request field to blame for a bad prompt: "prompt" or "messages"


def encode_prompt(tokenizer: Any, prompt: Prompt, vocab_size: int) -> EncodedPrompt:
    """Tokenize a text, chat or token-id prompt, rejecting empty prompts and unknown ids."""
    if isinstance(prompt, str):
        if not prompt:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        return EncodedPrompt(
            _ids(tokenizer.encode(prompt, add_special_tokens=True)), prompt, "prompt"
        )
    if len(prompt) == 0:
        raise InvalidRequestError("the prompt is empty", param="prompt")
    if all(isinstance(m, ChatMessage) for m in prompt):
        text, add_special = render_chat(tokenizer, prompt)  # type: ignore[arg-type]
        ids = _ids(tokenizer.encode(text, add_special_tokens=add_special))
        if not ids:
            raise InvalidRequestError("the messages render to an empty prompt", param="messages")
        return EncodedPrompt(ids, text, "messages")
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        raise InvalidRequestError(
            "a prompt is a string, chat messages or token ids, not a mix", param="prompt"
        )
    ids = [int(t) for t in prompt if isinstance(t, int)]
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise InvalidRequestError(
            f"token id {bad} is out of the vocabulary (0..{vocab_size - 1})", param="prompt"
        )
    return EncodedPrompt(ids, tokenizer.decode(ids, skip_special_tokens=False), "prompt")


def render_chat(tokenizer: Any, messages: Sequence[ChatMessage]) -> tuple[str, bool]:
    """The conversation as prompt text with the assistant's turn opened, and whether the tokenizer
    should still add its special tokens (the templates write BOS themselves; the fallback does not).
    """
    validate_messages(messages)
    if getattr(tokenizer, "chat_template", None):
        conversation = [{"role": m.role, "content": m.content} for m in messages]
        try:
            rendered = tokenizer.apply_chat_template(
                conversation, add_generation_prompt=True, tokenize=False
            )
        except jinja2.TemplateError as exc:
            # Templates raise to refuse conversations (e.g. roles that do not alternate).
            raise InvalidRequestError(
                f"the chat template refused the messages: {exc}", param="messages"
            ) from exc
        return _as_text(tokenizer, rendered), False
    lines = [f"{m.role}: {m.content}\n" for m in messages]
    return "".join(lines) + "assistant:", True


def validate_messages(messages: Sequence[ChatMessage]) -> None:
    if not messages:
        raise InvalidRequestError("messages must not be empty", param="messages")
    for i, message in enumerate(messages):
        if message.role not in CHAT_ROLES:
            raise InvalidRequestError(
                f"messages[{i}].role is {message.role!r}; expected one of {', '.join(CHAT_ROLES)}",
                param="messages",
            )


def _as_text(tokenizer: Any, rendered: Any) -> str:
    """apply_chat_template returns a str for tokenize=False; tolerate ids or a BatchEncoding."""
    if isinstance(rendered, str):
        return rendered
    if isinstance(rendered, Mapping) or hasattr(rendered, "input_ids"):
        rendered = rendered["input_ids"]
    return str(tokenizer.decode(_ids(rendered), skip_special_tokens=False))


def _ids(encoded: Any) -> list[int]:
    """Token ids from a list, a nested [[...]] list or a BatchEncoding/dict (transformers 5)."""
    if isinstance(encoded, Mapping) or hasattr(encoded, "input_ids"):
        encoded = encoded["input_ids"]
    if hasattr(encoded, "tolist"):
        encoded = encoded.tolist()
    if encoded and isinstance(encoded[0], list):
        encoded = encoded[0]
    return [int(t) for t in encoded]
