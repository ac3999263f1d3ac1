"""Prompt to token ids: plain text, token ids, or a conversation (with tools and extra template
variables) rendered with the tokenizer's chat template, or a plain `role: content` fallback when the
tokenizer has none.

Templates that know tools get them as transformers passes them (`tools=`, assistant `tool_calls`,
"tool" turns); templates that do not (like SmolLM2's ChatML) get the tools described in a
Hermes-style system block, with calls and results written into the turns' text, so that the
"hermes" output parser reads the model's answer.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jinja2

from services.common.errors import InvalidRequestError
from services.worker.engine.interface import ChatMessage, Conversation, Prompt, ToolDefinition
from services.worker.engine.output_parsing import detect_reasoning_parser, detect_tool_call_parser
from services.worker.engine.tools import parameters_schema

CHAT_ROLES = ("system", "user", "assistant", "tool")
# apply_chat_template's own arguments and the variables transformers sets itself: a request's
# template variables must not replace them.
RESERVED_TEMPLATE_KWARGS = frozenset(
    {
        "conversation",
        "messages",
        "tools",
        "documents",
        "chat_template",
        "add_generation_prompt",
        "continue_final_message",
        "tokenize",
        "sanitize_control_tokens",
        "padding",
        "truncation",
        "max_length",
        "return_tensors",
        "return_dict",
        "return_assistant_tokens_mask",
        "tokenizer_kwargs",
        "bos_token",
        "eos_token",
        "unk_token",
        "pad_token",
        "sep_token",
        "cls_token",
        "mask_token",
        "additional_special_tokens",
        "raise_exception",
        "strftime_now",
    }
)
# The generation prompt of thinking models may open the reasoning block for the model.
REASONING_OPENERS = ("<think>",)

HERMES_TOOLS_PREAMBLE = (
    "# Tools\n\n"
    "You may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
HERMES_TOOLS_INSTRUCTIONS = (
    "</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n"
    '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
)


@dataclass(frozen=True)
class EncodedPrompt:
    token_ids: list[int]
    text: str  # what the ids stand for, for echo
    param: str  # the request field to blame for a bad prompt: "prompt" or "messages"
    # The rendered prompt ends inside a reasoning block (<think> opened by the template), so the
    # output starts with reasoning.
    reasoning_open: bool = False


@dataclass(frozen=True)
class RenderedChat:
    text: str
    add_special_tokens: bool  # the templates write BOS themselves; the fallback does not
    reasoning_open: bool


def encode_prompt(tokenizer: Any, prompt: Prompt, vocab_size: int) -> EncodedPrompt:
    """Tokenize a text, chat or token-id prompt, rejecting empty prompts and unknown ids."""
    if isinstance(prompt, str):
        if not prompt:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        return EncodedPrompt(
            _ids(tokenizer.encode(prompt, add_special_tokens=True)), prompt, "prompt"
        )
    if isinstance(prompt, Conversation) or (
        len(prompt) > 0 and all(isinstance(m, ChatMessage) for m in prompt)
    ):
        rendered = render_conversation(tokenizer, _as_conversation(prompt))  # type: ignore[arg-type]
        ids = _ids(tokenizer.encode(rendered.text, add_special_tokens=rendered.add_special_tokens))
        if not ids:
            raise InvalidRequestError("the messages render to an empty prompt", param="messages")
        return EncodedPrompt(ids, rendered.text, "messages", rendered.reasoning_open)
    if len(prompt) == 0:
        raise InvalidRequestError("the prompt is empty", param="prompt")
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


def render_chat(tokenizer: Any, messages: Sequence[ChatMessage] | Conversation) -> tuple[str, bool]:
    """The conversation as prompt text with the assistant's turn opened, and whether the tokenizer
    should still add its special tokens."""
    rendered = render_conversation(tokenizer, _as_conversation(messages))
    return rendered.text, rendered.add_special_tokens


def render_conversation(tokenizer: Any, conversation: Conversation) -> RenderedChat:
    """Render with the chat template (tools natively or as Hermes instructions, template variables
    passed through) or the plain fallback, and tell whether it leaves a reasoning block open."""
    validate_messages(conversation)
    kwargs = dict(conversation.template_kwargs)
    reserved = sorted(RESERVED_TEMPLATE_KWARGS & kwargs.keys())
    if reserved:
        raise InvalidRequestError(
            f"chat template variables must not set {', '.join(reserved)}",
            param="chat_template_kwargs",
        )
    tools = conversation.tools
    hermes = bool(tools) or _has_tool_turns(conversation.messages)
    if not getattr(tokenizer, "chat_template", None):
        turns = _with_hermes_tools(conversation.messages, tools) if hermes else _plain(conversation)
        lines = [f"{turn['role']}: {turn['content']}\n" for turn in turns]
        return RenderedChat("".join(lines) + "assistant:", True, False)
    if hermes and template_uses_tools(tokenizer):
        text = _apply(
            tokenizer,
            [_native_message(m) for m in conversation.messages],
            [tool_schema(tool) for tool in tools] or None,
            kwargs,
        )
    elif hermes:
        turns = _with_hermes_tools(conversation.messages, tools)
        try:
            text = _apply(tokenizer, turns, None, kwargs)
        except InvalidRequestError:
            if not any(turn["role"] == "tool" for turn in turns):
                raise
            # The template cannot render a "tool" role: tool results become user turns.
            for turn in turns:
                if turn["role"] == "tool":
                    turn["role"] = "user"
            text = _apply(tokenizer, turns, None, kwargs)
    else:
        text = _apply(tokenizer, _plain(conversation), None, kwargs)
    return RenderedChat(text, False, _ends_in_reasoning(text))


def template_uses_tools(tokenizer: Any) -> bool:
    """Whether the template (the "tool_use" one, for tokenizers with several) renders `tools`."""
    template = tokenizer.chat_template
    if isinstance(template, Mapping):
        template = template.get("tool_use") or template.get("default") or ""
    return isinstance(template, str) and "tools" in template


def output_parsers(tokenizer: Any) -> tuple[str, str]:
    """The tool-call and reasoning parsers for the model's output, from its chat template(s)."""
    template = getattr(tokenizer, "chat_template", None) or ""
    if isinstance(template, Mapping):
        template = "\n".join(str(t) for t in template.values())
    return detect_tool_call_parser(template), detect_reasoning_parser(template)


def tool_schema(tool: ToolDefinition) -> dict[str, Any]:
    """A tool as transformers and OpenAI write it."""
    function: dict[str, Any] = {"name": tool.name}
    if tool.description:
        function["description"] = tool.description
    function["parameters"] = dict(parameters_schema(tool))
    return {"type": "function", "function": function}


def hermes_tools_block(tools: Sequence[ToolDefinition]) -> str:
    """The system text that teaches a template without tools to call them Hermes-style."""
    signatures = "".join(f"\n{json.dumps(tool_schema(tool))}" for tool in tools)
    return f"{HERMES_TOOLS_PREAMBLE}{signatures}\n{HERMES_TOOLS_INSTRUCTIONS}"


def validate_messages(messages: Sequence[ChatMessage] | Conversation) -> None:
    turns = messages.messages if isinstance(messages, Conversation) else messages
    if not turns:
        raise InvalidRequestError("messages must not be empty", param="messages")
    for i, message in enumerate(turns):
        if message.role not in CHAT_ROLES:
            raise InvalidRequestError(
                f"messages[{i}].role is {message.role!r}; expected one of {', '.join(CHAT_ROLES)}",
                param="messages",
            )
        if message.role == "tool" and not message.tool_call_id:
            raise InvalidRequestError(
                f"messages[{i}] is a tool result without tool_call_id", param="messages"
            )
        if message.tool_calls and message.role != "assistant":
            raise InvalidRequestError(
                f"messages[{i}] has tool_calls but only assistant turns call tools",
                param="messages",
            )


def _as_conversation(prompt: Sequence[ChatMessage] | Conversation) -> Conversation:
    return prompt if isinstance(prompt, Conversation) else Conversation(messages=tuple(prompt))


def _plain(conversation: Conversation) -> list[dict[str, Any]]:
    return [{"role": m.role, "content": m.content} for m in conversation.messages]


def _has_tool_turns(messages: Sequence[ChatMessage]) -> bool:
    return any(m.role == "tool" or m.tool_calls for m in messages)


def _native_message(message: ChatMessage) -> dict[str, Any]:
    """A turn as transformers' tool-aware templates expect it (arguments as a dict)."""
    turn: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.tool_calls:
        turn["tool_calls"] = [
            {
                "id": call.id,
                "type": "function",
                "function": {"name": call.name, "arguments": _arguments(call.arguments)},
            }
            for call in message.tool_calls
        ]
    if message.role == "tool":
        turn["tool_call_id"] = message.tool_call_id
    if message.name:
        turn["name"] = message.name
    return turn


def _with_hermes_tools(
    messages: Sequence[ChatMessage], tools: Sequence[ToolDefinition]
) -> list[dict[str, Any]]:
    """Plain turns for a template without tools: the tools in the system turn, calls as
    <tool_call> blocks in the assistant's text, results as <tool_response> text."""
    turns: list[dict[str, Any]] = []
    for message in messages:
        content = message.content
        if message.tool_calls:
            blocks = [
                "<tool_call>\n"
                + json.dumps({"name": call.name, "arguments": _arguments(call.arguments)})
                + "\n</tool_call>"
                for call in message.tool_calls
            ]
            content = "\n".join([content, *blocks] if content else blocks)
        elif message.role == "tool":
            content = f"<tool_response>\n{content}\n</tool_response>"
        turns.append({"role": message.role, "content": content})
    if tools:
        block = hermes_tools_block(tools)
        if turns and turns[0]["role"] == "system":
            system = turns[0]["content"]
            turns[0]["content"] = f"{system}\n\n{block}" if system else block
        else:
            turns.insert(0, {"role": "system", "content": block})
    return turns


def _arguments(text: str) -> Any:
    """A call's arguments as the template wants them: parsed JSON (services/worker/convert.py
    checked it)."""
    try:
        return json.loads(text) if text else {}
    except ValueError as exc:
        raise InvalidRequestError(
            f"tool call arguments must be JSON: {exc}", param="messages"
        ) from exc


def _apply(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None,
    kwargs: Mapping[str, Any],
) -> str:
    try:
        rendered = tokenizer.apply_chat_template(
            messages, tools=tools, add_generation_prompt=True, tokenize=False, **kwargs
        )
    except jinja2.TemplateError as exc:
        # Templates raise to refuse conversations (e.g. roles that do not alternate).
        raise InvalidRequestError(
            f"the chat template refused the messages: {exc}", param="messages"
        ) from exc
    return _as_text(tokenizer, rendered)


def _ends_in_reasoning(text: str) -> bool:
    tail = text.rstrip()
    return any(tail.endswith(opener) for opener in REASONING_OPENERS)


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
