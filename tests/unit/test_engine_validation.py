"""The engine's request checks (services/worker/engine/validation.py), the one home of the ranges
that the worker's protobuf conversion and the engine both apply."""

from __future__ import annotations

import pytest

from services.common.errors import InvalidRequestError
from services.common.limits import MAX_TOP_LOGPROBS
from services.worker.engine.interface import SamplingParams, StoppingParams
from services.worker.engine.validation import (
    GREEDY_BELOW_TEMPERATURE,
    MIN_REPETITION_PENALTY,
    check_context,
    greedy_if_tiny,
    validate_logit_bias,
    validate_sampling,
    validate_stopping,
    validate_top_logprobs,
)


def test_repetition_penalty_has_one_lower_bound() -> None:
    validate_sampling(SamplingParams(repetition_penalty=MIN_REPETITION_PENALTY))
    with pytest.raises(InvalidRequestError) as caught:
        validate_sampling(SamplingParams(repetition_penalty=MIN_REPETITION_PENALTY / 2))
    assert caught.value.param == "repetition_penalty"
    assert str(MIN_REPETITION_PENALTY) in caught.value.message


def test_tiny_temperatures_become_greedy_and_others_stay() -> None:
    assert greedy_if_tiny(SamplingParams(temperature=GREEDY_BELOW_TEMPERATURE / 2)).greedy
    assert greedy_if_tiny(SamplingParams(temperature=0.5)).temperature == 0.5


def test_top_logprobs_error_names_the_callers_field() -> None:
    validate_top_logprobs(None)
    validate_top_logprobs(MAX_TOP_LOGPROBS)
    for param in ("logprobs", "top_logprobs"):
        with pytest.raises(InvalidRequestError) as caught:
            validate_top_logprobs(MAX_TOP_LOGPROBS + 1, param=param)
        assert caught.value.param == param


def test_logit_bias_ids_are_checked_only_against_a_known_vocabulary() -> None:
    validate_logit_bias(((10_000, 1.0),))
    with pytest.raises(InvalidRequestError):
        validate_logit_bias(((10_000, 1.0),), vocab_size=100)


@pytest.mark.parametrize(
    ("stopping", "echo", "param"),
    [
        (StoppingParams(max_tokens=0), False, "max_tokens"),
        (StoppingParams(min_tokens=-1), False, "min_tokens"),
        (StoppingParams(max_tokens=2, min_tokens=3), False, "min_tokens"),
        (StoppingParams(stop=("ok", "")), False, "stop"),
        (StoppingParams(stop_token_ids=(100,)), False, "stop_token_ids"),
    ],
)
def test_stopping_errors_name_the_field(stopping: StoppingParams, echo: bool, param: str) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        validate_stopping(stopping, echo=echo, vocab_size=100)
    assert caught.value.param == param


def test_max_tokens_zero_scores_an_echoed_prompt() -> None:
    validate_stopping(StoppingParams(max_tokens=0), echo=True)


def test_the_completion_gets_the_room_the_prompt_leaves() -> None:
    assert check_context(10, None, 64, "prompt") == 54
    assert check_context(10, 5, 64, "prompt") == 5
    with pytest.raises(InvalidRequestError) as caught:
        check_context(64, None, 64, "messages")
    assert caught.value.param == "messages" and "the messages" in caught.value.message
    with pytest.raises(InvalidRequestError) as caught:
        check_context(10, 55, 64, "prompt")
    assert caught.value.param == "max_tokens"
