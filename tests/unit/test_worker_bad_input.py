"""Sampling values that would break float32 arithmetic in the sampler are handled where requests
enter the worker (services.worker.convert, by the rules of services.worker.engine.validation),
found by tests/fuzz/test_worker_rpc_fuzz.py."""

from __future__ import annotations

import pytest

from chatfleet.v1 import worker_pb2
from services.common.errors import InvalidRequestError
from services.worker.convert import to_generation_request
from services.worker.engine.validation import MIN_REPETITION_PENALTY


def request(**sampling: float) -> worker_pb2.GenerateRequest:
    return worker_pb2.GenerateRequest(
        model="m", text="Hello", sampling=worker_pb2.SamplingParams(**sampling)
    )


@pytest.mark.parametrize("temperature", [1e-45, 1e-40, 1e-30, 9e-6])
def test_tiny_temperatures_decode_greedily(temperature: float) -> None:
    # Logits divided by a subnormal temperature overflow to inf: NaN probabilities.
    assert to_generation_request(request(temperature=temperature)).sampling.greedy


def test_small_temperatures_still_sample() -> None:
    assert to_generation_request(request(temperature=0.01)).sampling.temperature == pytest.approx(
        0.01
    )


@pytest.mark.parametrize("penalty", [1e-45, 1e-30, 0.0075])
def test_tiny_repetition_penalties_are_refused(penalty: float) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        to_generation_request(request(temperature=1.0, repetition_penalty=penalty))
    assert caught.value.param == "repetition_penalty"
    assert str(MIN_REPETITION_PENALTY) in caught.value.message


@pytest.mark.parametrize("penalty", [MIN_REPETITION_PENALTY, 0.01])
def test_small_repetition_penalties_are_accepted(penalty: float) -> None:
    # 0.01 is the gateway's bound; it reaches the worker rounded to float32, a little lower.
    sampling = to_generation_request(request(repetition_penalty=penalty)).sampling
    assert sampling.repetition_penalty == pytest.approx(penalty)
