"""Chat prompts with tools (native templates and Hermes instructions for the others), template
variables, and the JSON Schemas that force tool calls."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest
from transformers import PreTrainedTokenizerFast

from services.common.errors import InvalidRequestError
from services.worker.engine.interface import (
    ChatMessage,
    ConstraintKind,
    Conversation,
    ToolCall,
    ToolDefinition,
)
from services.worker.engine.prompts import (
    encode_prompt,
    output_parsers,
    render_conversation,
    template_uses_tools,
)
from services.worker.engine.tools import (
    ToolChoice,
    ToolChoiceMode,
    named_schema,
    required_schema,
    tool_constraint,
)
from tests.unit.models import build_byte_level_tokenizer

# A Qwen-like template that renders tools, assistant tool_calls and tool turns itself.
TOOLS_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\nTOOLS:{% for t in tools %}{{ t | tojson }}\n{% endfor %}"
    "<|im_end|>\n{% endif %}"
    "{%- for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{%- if m.tool_calls %}{% for c in m.tool_calls %}<tool_call>{{ c.function | tojson }}"
    "</tool_call>{% endfor %}{% endif %}"
    "{%- if m.role == 'tool' %}[{{ m.tool_call_id }}]{% endif %}<|im_end|>\n{% endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking %}<think>\n{% endif %}{% endif %}"
)
# A template that accepts only the three classic roles.
STRICT_TEMPLATE = (
    "{% for m in messages %}{% if m.role not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('bad role ' + m.role) }}{% endif %}"
    "<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

WEATHER = ToolDefinition(
    name="get_weather",
    description="The weather in a city.",
    parameters={
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
)
CLOCK = ToolDefinition(name="now")

HISTORY = (
    ChatMessage("user", "Weather in Paris?"),
    ChatMessage(
        "assistant",
        "",
        tool_calls=(ToolCall(id="call_1", name="get_weather", arguments='{"city": "Paris"}'),),
    ),
    ChatMessage("tool", "sunny", tool_call_id="call_1", name="get_weather"),
)


def tokenizer(template: str | None) -> PreTrainedTokenizerFast:
    tok = build_byte_level_tokenizer(chat_template=False)
    if template is not None:
        tok.chat_template = template
    return tok


@pytest.fixture(scope="module")
def chatml() -> PreTrainedTokenizerFast:
    return build_byte_level_tokenizer()


def test_native_tools_template(chatml: Any) -> None:
    tok = tokenizer(TOOLS_TEMPLATE)
    assert template_uses_tools(tok) and not template_uses_tools(chatml)
    rendered = render_conversation(tok, Conversation(HISTORY, tools=(WEATHER, CLOCK)))
    text = rendered.text
    tools_line = text.split("TOOLS:")[1].split("\n")[0]
    assert json.loads(tools_line) == {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city.",
            "parameters": dict(WEATHER.parameters or {}),
        },
    }
    assert '"parameters": {"type": "object", "properties": {}}' in text  # `now` has none
    # Arguments reach the template as a dict, not as JSON text.
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}' in text
    assert "<|im_start|>tool\nsunny[call_1]<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n") and not rendered.reasoning_open


def test_template_kwargs_and_an_open_reasoning_block() -> None:
    tok = tokenizer(TOOLS_TEMPLATE)
    conversation = Conversation(
        (ChatMessage("user", "Hi"),), template_kwargs={"enable_thinking": True}
    )
    encoded = encode_prompt(tok, conversation, len(tok))
    assert encoded.text.endswith("<think>\n") and encoded.reasoning_open
    assert encoded.param == "messages" and encoded.token_ids
    with pytest.raises(InvalidRequestError) as caught:
        render_conversation(
            tok, Conversation((ChatMessage("user", "Hi"),), template_kwargs={"tokenize": True})
        )
    assert caught.value.param == "chat_template_kwargs"


def test_hermes_instructions_for_a_template_without_tools(chatml: Any) -> None:
    text = render_conversation(chatml, Conversation(HISTORY, tools=(WEATHER,))).text
    system, rest = text.split("<|im_end|>\n", 1)
    assert system.startswith("<|im_start|>system\n# Tools")
    assert (
        "<tools>\n"
        + json.dumps(
            {
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "description": "The weather in a city.",
                    "parameters": dict(WEATHER.parameters or {}),
                },
            }
        )
        in system
    )
    assert "<tool_call></tool_call> XML tags" in system
    assert (
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": '
        '{"city": "Paris"}}\n</tool_call><|im_end|>' in rest
    )
    assert "<|im_start|>tool\n<tool_response>\nsunny\n</tool_response><|im_end|>" in rest


def test_hermes_block_joins_the_system_turn(chatml: Any) -> None:
    messages = (ChatMessage("system", "Be brief."), ChatMessage("user", "Hi"))
    text = render_conversation(chatml, Conversation(messages, tools=(WEATHER,))).text
    assert text.startswith("<|im_start|>system\nBe brief.\n\n# Tools")
    assert text.count("<|im_start|>system") == 1


def test_tool_turns_become_user_turns_when_the_template_refuses_them() -> None:
    text = render_conversation(tokenizer(STRICT_TEMPLATE), Conversation(HISTORY)).text
    assert "<|im_start|>user\n<tool_response>\nsunny\n</tool_response>" in text


def test_fallback_without_a_template() -> None:
    rendered = render_conversation(tokenizer(None), Conversation(HISTORY[:1], tools=(WEATHER,)))
    assert rendered.text.startswith("system: # Tools")
    assert rendered.text.endswith("user: Weather in Paris?\nassistant:")
    assert rendered.add_special_tokens


def test_plain_messages_render_as_before(chatml: Any) -> None:
    messages = [ChatMessage("system", "Be brief."), ChatMessage("user", "Hi")]
    as_list = encode_prompt(chatml, messages, len(chatml))
    as_conversation = encode_prompt(chatml, Conversation(tuple(messages)), len(chatml))
    assert as_list == as_conversation
    assert as_list.text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_tool_turn_needs_its_call_id(chatml: Any) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        encode_prompt(chatml, [ChatMessage("tool", "x")], len(chatml))
    assert caught.value.param == "messages"


REQUIRED_OK = [
    [{"name": "get_weather", "arguments": {"city": "Paris"}}],
    [{"name": "now", "arguments": {}}, {"name": "get_weather", "arguments": {"city": "X"}}],
]
REQUIRED_BAD = [
    [],
    [{"name": "get_weather", "arguments": {}}],  # city is required
    [{"name": "other", "arguments": {}}],
    [{"name": "now"}],
    [{"name": "now", "arguments": {}, "extra": 1}],
]


@pytest.mark.parametrize("value", REQUIRED_OK)
def test_required_schema_accepts_calls(value: object) -> None:
    jsonschema.validate(value, required_schema([WEATHER, CLOCK]))


@pytest.mark.parametrize("value", REQUIRED_BAD)
def test_required_schema_refuses_non_calls(value: object) -> None:
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(value, required_schema([WEATHER, CLOCK]))


def test_required_schema_without_parallel_calls_allows_one() -> None:
    schema = required_schema([WEATHER, CLOCK], parallel_tool_calls=False)
    jsonschema.validate(REQUIRED_OK[0], schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(REQUIRED_OK[1], schema)


def test_named_schema_is_the_functions_arguments() -> None:
    jsonschema.validate({"city": "Paris"}, named_schema([WEATHER, CLOCK], "get_weather"))
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({}, named_schema([WEATHER, CLOCK], "get_weather"))
    assert named_schema([WEATHER, CLOCK], "now") == {"type": "object", "properties": {}}
    with pytest.raises(InvalidRequestError) as caught:
        named_schema([WEATHER], "nope")
    assert caught.value.param == "tool_choice"


def test_tool_constraint_only_for_forced_choices() -> None:
    assert tool_constraint([WEATHER], ToolChoice(ToolChoiceMode.AUTO)) is None
    assert tool_constraint([WEATHER], ToolChoice(ToolChoiceMode.NONE)) is None
    forced = tool_constraint([WEATHER], ToolChoice(ToolChoiceMode.NAMED, name="get_weather"))
    assert forced is not None and forced.kind is ConstraintKind.JSON_SCHEMA
    assert json.loads(forced.spec) == dict(WEATHER.parameters or {})


def test_output_parsers_follow_the_template(chatml: Any) -> None:
    assert output_parsers(chatml) == ("hermes", "")
    thinking = tokenizer(TOOLS_TEMPLATE)
    assert output_parsers(thinking) == ("hermes", "think")
    assert output_parsers(tokenizer("[TOOL_CALLS] {{ messages }}")) == ("mistral", "")
    assert output_parsers(tokenizer(None)) == ("hermes", "")
