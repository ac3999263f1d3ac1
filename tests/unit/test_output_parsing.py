"""The worker's streaming output parsing: tool-call syntaxes, forced tool choice, reasoning, and
that streaming piece by piece gives what parsing in one piece gives."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import pytest

from services.worker.engine.interface import FinishReason, GenerationChunk, ToolCallDelta
from services.worker.engine.output_parsing import (
    OutputParser,
    create_output_parser,
    detect_reasoning_parser,
    detect_tool_call_parser,
)
from services.worker.engine.tools import ToolChoice, ToolChoiceMode


@dataclass
class Parsed:
    content: str = ""
    reasoning: str = ""
    calls: list[dict[str, str]] = field(default_factory=list)
    finish: FinishReason | None = None
    chunks: list[GenerationChunk] = field(default_factory=list)

    @property
    def arguments(self) -> list[object]:
        return [json.loads(call["arguments"]) for call in self.calls]


def ids() -> Callable[[], str]:
    counter = itertools.count()
    return lambda: f"call_{next(counter):024x}"


def run(
    make: Callable[[], OutputParser],
    pieces: Iterable[str],
    finish: FinishReason = FinishReason.STOP,
) -> Parsed:
    parser = make()
    pieces = list(pieces)
    inputs = [GenerationChunk(text=p, token_ids=[i]) for i, p in enumerate(pieces)]
    inputs.append(
        GenerationChunk(text="", token_ids=[], finish_reason=finish, completion_tokens=len(pieces))
    )
    result = Parsed()
    for chunk in inputs:
        out = parser.parse(chunk)
        result.chunks.append(out)
        result.content += out.text
        result.reasoning += out.reasoning_text
        for delta in out.tool_calls:
            if delta.index == len(result.calls):
                assert delta.id.startswith("call_") and len(delta.id) == 29
                assert delta.name
                result.calls.append({"id": delta.id, "name": delta.name, "arguments": ""})
            else:
                assert delta.index == len(result.calls) - 1 and not delta.id and not delta.name
            result.calls[delta.index]["arguments"] += delta.arguments
        result.finish = out.finish_reason
    assert [c.token_ids for c in result.chunks] == [c.token_ids for c in inputs]
    assert result.chunks[-1].completion_tokens == len(pieces)
    return result


def both_ways(make: Callable[[], OutputParser], text: str, **kwargs: object) -> Parsed:
    """Parse `text` in one piece and char by char; they must agree."""
    whole = run(make, [text], **kwargs)  # type: ignore[arg-type]
    streamed = run(make, list(text), **kwargs)  # type: ignore[arg-type]
    for a, b in ((whole, streamed),):
        assert (a.content, a.reasoning, a.finish) == (b.content, b.reasoning, b.finish)
        assert [(c["name"], c["arguments"]) for c in a.calls] == [
            (c["name"], c["arguments"]) for c in b.calls
        ]
    return streamed


def parser(syntax: str | None = "hermes", **kwargs: object) -> Callable[[], OutputParser]:
    return lambda: OutputParser(syntax, call_id=ids(), **kwargs)  # type: ignore[arg-type]


def test_plain_text_passes_through() -> None:
    result = both_ways(parser(None), "Hello <tool_call> world")
    assert result.content == "Hello <tool_call> world"
    assert (result.calls, result.finish) == ([], FinishReason.STOP)


def test_hermes_calls_and_surrounding_content() -> None:
    text = (
        "Let me check.\n<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n'
        "</tool_call>\n<tool_call>\n"
        '{"arguments": {"q": "a \\"}\\" b"}, "name": "search"}\n</tool_call>'
    )
    result = both_ways(parser(), text)
    assert result.content == "Let me check.\n"
    assert [c["name"] for c in result.calls] == ["get_weather", "search"]
    assert result.arguments == [{"city": "Paris", "unit": "c"}, {"q": 'a "}" b'}]
    assert result.finish is FinishReason.TOOL_CALLS


def test_hermes_streams_arguments_before_the_call_ends() -> None:
    parse = parser()()
    out = parse.parse(
        GenerationChunk(text='<tool_call>{"name": "f", "arguments": {"a": [1, ', token_ids=[])
    )
    assert out.tool_calls == [
        ToolCallDelta(index=0, id=out.tool_calls[0].id, name="f", arguments='{"a": [1, ')
    ]
    out = parse.parse(GenerationChunk(text="2]", token_ids=[]))
    assert out.tool_calls == [ToolCallDelta(index=0, arguments="2]")]
    assert out.text == ""


def test_hermes_holds_back_only_a_possible_tag() -> None:
    parse = parser()()
    assert parse.parse(GenerationChunk(text="a <tool", token_ids=[])).text == "a "
    assert parse.parse(GenerationChunk(text="box>", token_ids=[])).text == "<toolbox>"
    final = parse.parse(GenerationChunk(text=" <to", token_ids=[], finish_reason=FinishReason.STOP))
    assert (final.text, final.finish_reason) == (" <to", FinishReason.STOP)


@pytest.mark.parametrize(
    "block",
    [
        "<tool_call>not json</tool_call>",
        '<tool_call>{"name": "f", "oops"}</tool_call>',
        '<tool_call>{"arguments": {}}</tool_call>',
        '<tool_call>{"name": "f", "arguments": 3}</tool_call>',
    ],
)
def test_hermes_malformed_call_is_content(block: str) -> None:
    result = both_ways(parser(), f"Hi {block} bye")
    assert result.content == f"Hi {block} bye"
    assert (result.calls, result.finish) == ([], FinishReason.STOP)


def test_hermes_unfinished_call_without_arguments_is_content() -> None:
    result = both_ways(parser(), '<tool_call>{"name": "f"', finish=FinishReason.LENGTH)
    assert result.content == '<tool_call>{"name": "f"'
    assert result.finish is FinishReason.LENGTH


def test_length_is_kept_with_a_truncated_call() -> None:
    result = both_ways(
        parser(), '<tool_call>{"name": "f", "arguments": {"a": 1', finish=FinishReason.LENGTH
    )
    assert result.calls[0]["arguments"] == '{"a": 1'
    assert result.finish is FinishReason.LENGTH


def test_call_without_arguments_gets_an_empty_object() -> None:
    result = both_ways(parser(), '<tool_call>{"name": "now"}</tool_call>')
    assert result.calls[0]["name"] == "now" and result.arguments == [{}]


def test_arguments_given_as_json_text() -> None:
    result = both_ways(
        parser(), '<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>'
    )
    assert result.arguments == [{"a": 1}]


def test_parallel_calls_off_keeps_the_first() -> None:
    text = (
        '<tool_call>{"name": "a", "arguments": {}}</tool_call>'
        '<tool_call>{"name": "b", "arguments": {"x": 1}}</tool_call>'
    )
    choice = ToolChoice(ToolChoiceMode.AUTO, parallel_tool_calls=False)
    result = both_ways(parser(tool_choice=choice), text)
    assert [c["name"] for c in result.calls] == ["a"]
    assert result.finish is FinishReason.TOOL_CALLS


def test_llama3_json() -> None:
    text = '<|python_tag|>{"name": "a", "parameters": {"x": 1}}; {"name": "b", "parameters": {}}'
    result = both_ways(parser("llama3_json"), text)
    assert [c["name"] for c in result.calls] == ["a", "b"]
    assert result.arguments == [{"x": 1}, {}]
    assert result.content == ""
    bare = both_ways(parser("llama3_json"), '  {"name": "a", "arguments": {"x": 2}}')
    assert bare.arguments == [{"x": 2}] and bare.content == ""


def test_llama3_json_text_and_plain_json_stay_content() -> None:
    assert both_ways(parser("llama3_json"), "Paris {is} nice").content == "Paris {is} nice"
    answer = '{"answer": 42}'
    result = both_ways(parser("llama3_json"), answer)
    assert (result.content, result.calls) == (answer, [])


def test_mistral() -> None:
    text = (
        'Sure. [TOOL_CALLS] [{"name": "a", "arguments": {"x": "]"}}, '
        '{"name": "b", "arguments": {}}]'
    )
    result = both_ways(parser("mistral"), text)
    assert result.content == "Sure. "
    assert [c["name"] for c in result.calls] == ["a", "b"]
    assert result.arguments == [{"x": "]"}, {}]
    broken = both_ways(parser("mistral"), "[TOOL_CALLS] nope")
    assert broken.content == "[TOOL_CALLS] nope" and broken.calls == []


def test_forced_named_call_streams_the_whole_output_as_arguments() -> None:
    choice = ToolChoice(ToolChoiceMode.NAMED, name="get_weather")
    result = both_ways(parser(tool_choice=choice), '{"city": "Paris"}')
    assert result.calls[0]["name"] == "get_weather"
    assert result.arguments == [{"city": "Paris"}]
    assert (result.content, result.finish) == ("", FinishReason.TOOL_CALLS)


def test_forced_required_calls() -> None:
    choice = ToolChoice(ToolChoiceMode.REQUIRED)
    text = '[{"name": "a", "arguments": {"s": "x{y"}}, {"name": "b", "arguments": {"n": [1, {}]}}]'
    result = both_ways(parser(tool_choice=choice), text)
    assert [c["name"] for c in result.calls] == ["a", "b"]
    assert result.arguments == [{"s": "x{y"}, {"n": [1, {}]}]
    single = both_ways(
        parser(tool_choice=ToolChoice(ToolChoiceMode.REQUIRED, parallel_tool_calls=False)), text
    )
    assert [c["name"] for c in single.calls] == ["a"]


def test_reasoning_split() -> None:
    text = "<think>\nThe user wants x.\n</think>\n\nThe answer."
    result = both_ways(parser(None, reasoning=True), text)
    assert result.reasoning == "The user wants x.\n"
    assert result.content == "The answer."


def test_reasoning_opened_by_the_prompt() -> None:
    result = both_ways(parser(None, reasoning=True, start_in_reasoning=True), "hmm</think>ok")
    assert (result.reasoning, result.content) == ("hmm", "ok")


def test_unfinished_reasoning_and_partial_tags_are_kept() -> None:
    result = both_ways(parser(None, reasoning=True), "<think>abc</thi", finish=FinishReason.LENGTH)
    assert (result.reasoning, result.content) == ("abc</thi", "")


def test_tool_call_inside_reasoning_is_reasoning() -> None:
    text = (
        '<think>maybe <tool_call>{"name": "x"}</tool_call></think>'
        '<tool_call>{"name": "y", "arguments": {}}</tool_call>'
    )
    result = both_ways(parser(reasoning=True), text)
    assert result.reasoning.startswith("maybe <tool_call>")
    assert [c["name"] for c in result.calls] == ["y"]


def test_echo_chunks_pass_through() -> None:
    echo = GenerationChunk(text="<tool_call>", is_prompt_echo=True, token_ids=[1])
    assert parser()().parse(echo) is echo


def test_create_output_parser_follows_the_tool_choice() -> None:
    none = create_output_parser("hermes", "", ToolChoice(ToolChoiceMode.NONE))
    out = none.parse(
        GenerationChunk(text="<tool_call>", token_ids=[], finish_reason=FinishReason.STOP)
    )
    assert out.text == "<tool_call>"
    auto = create_output_parser("", "think", ToolChoice(ToolChoiceMode.AUTO))
    text = '<think>r</think><tool_call>{"name": "f", "arguments": {}}</tool_call>'
    out = auto.parse(GenerationChunk(text=text, token_ids=[], finish_reason=FinishReason.STOP))
    assert (out.reasoning_text, out.finish_reason) == ("r", FinishReason.TOOL_CALLS)


def test_detection_from_the_chat_template() -> None:
    assert detect_tool_call_parser("{{ '<tool_call>' }}") == "hermes"
    assert detect_tool_call_parser("[TOOL_CALLS] {{ x }}") == "mistral"
    assert detect_tool_call_parser("<|python_tag|>") == "llama3_json"
    assert detect_tool_call_parser("<|im_start|>") == "hermes"
    assert detect_reasoning_parser("<think>\n") == "think"
    assert detect_reasoning_parser("<|im_start|>") == ""
