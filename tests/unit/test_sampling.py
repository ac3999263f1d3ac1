"""The vectorised sampler: per-row parameters over one [B, V] logits tensor."""

from __future__ import annotations

import math

import pytest
import torch

from services.common.errors import InvalidRequestError
from services.worker.engine.interface import SamplingParams
from services.worker.engine.sampling import SamplingState, sample
from services.worker.engine.validation import validate_logit_bias, validate_sampling

V = 8


def state(**params: float | int | None) -> SamplingState:
    top_logprobs = params.pop("logprobs", None)
    min_tokens = params.pop("min_tokens", 0)
    suppress = (0,) if min_tokens else ()
    return SamplingState(
        SamplingParams(**params),  # type: ignore[arg-type]
        vocab_size=V,
        prompt_ids=[1],
        top_logprobs=top_logprobs,  # type: ignore[arg-type]
        suppress_ids=suppress,
        min_tokens=int(min_tokens or 0),
    )


def logits(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


BASE = [5.0, 4.0, 3.0, 2.0, 1.0, 0.0, -1.0, -2.0]


def draws(row: SamplingState, values: list[float], n: int = 200) -> set[int]:
    return {sample(logits(values), [row]).token_ids[0] for _ in range(n)}


def test_greedy_rows_take_the_argmax_next_to_sampled_rows() -> None:
    rows = [state(temperature=0.0), state(temperature=1.0, seed=1), state(temperature=0.0)]
    out = sample(logits(BASE, BASE, BASE[::-1]), rows)
    assert out.token_ids[0] == 0 and out.token_ids[2] == 7
    assert 0 <= out.token_ids[1] < V
    assert out.logprobs == [None, None, None]


def test_top_k_top_p_min_p_limit_the_candidates() -> None:
    assert draws(state(temperature=5.0, top_k=2, seed=0), BASE) <= {0, 1}
    # softmax(BASE): p0 ~ 0.63, p1 ~ 0.23: top_p 0.8 keeps exactly those two.
    assert draws(state(temperature=1.0, top_p=0.8, seed=0), BASE) == {0, 1}
    # min_p 0.3: keep tokens with p >= 0.3 * p0, i.e. 0 and 1 (p1/p0 = e^-1 ~ 0.37).
    assert draws(state(temperature=1.0, min_p=0.3, seed=0), BASE) == {0, 1}
    # Combined per row in one batch: each row keeps its own limit.
    rows = [state(temperature=5.0, top_k=1, seed=1), state(temperature=5.0, top_k=3, seed=2)]
    seen: list[set[int]] = [set(), set()]
    for _ in range(200):
        out = sample(logits(BASE, BASE), rows)
        seen[0].add(out.token_ids[0])
        seen[1].add(out.token_ids[1])
    assert seen[0] == {0} and seen[1] <= {0, 1, 2} and len(seen[1]) > 1


def test_seeded_rows_repeat_whatever_the_batch() -> None:
    flat = [0.0] * V
    first = state(temperature=1.0, seed=42)
    second = state(temperature=1.0, seed=42)
    a = [sample(logits(flat), [first]).token_ids[0] for _ in range(20)]
    b = [
        sample(
            logits(flat, flat, flat), [state(temperature=1.0), second, state(temperature=2.0)]
        ).token_ids[1]
        for _ in range(20)
    ]
    assert a == b
    unseeded = {
        tuple(sample(logits(flat), [state()]).token_ids[0] for _ in range(10)) for _ in range(5)
    }
    assert len(unseeded) > 1


def test_repetition_penalty_is_ctrl_style_over_prompt_and_output() -> None:
    # Prompt token 1 is penalised: 4.0 / 4 = 1.0 < token 2's 3.0.
    row = state(temperature=0.0, repetition_penalty=4.0)
    assert sample(logits([0.0, 4.0, 3.0, 0, 0, 0, 0, 0]), [row]).token_ids == [2]
    # Now token 2 is in the output too: 3.0 / 4 = 0.75 < token 1's 1.0.
    assert sample(logits([0.0, 4.0, 3.0, 0, 0, 0, 0, 0]), [row]).token_ids == [1]
    # Negative logits are multiplied: -0.6 * 2 < -1.0.
    negative = state(temperature=0.0, repetition_penalty=2.0)
    assert sample(logits([-1.0, -0.6, -5, -5, -5, -5, -5, -5]), [negative]).token_ids == [0]


def test_presence_and_frequency_penalties_count_output_tokens() -> None:
    row = state(temperature=0.0, frequency_penalty=1.5)
    values = [3.0, 2.0, 0, 0, 0, 0, 0, 0]
    assert sample(logits(values), [row]).token_ids == [0]
    assert sample(logits(values), [row]).token_ids == [1]  # 3.0 - 1.5 < 2.0
    presence = state(temperature=0.0, presence_penalty=-2.0)  # negative: encourage repeats
    assert sample(logits([1.0, 2.0, 0, 0, 0, 0, 0, 0]), [presence]).token_ids == [1]
    assert sample(logits([3.5, 2.0, 0, 0, 0, 0, 0, 0]), [presence]).token_ids == [1]


def test_min_tokens_masks_stop_ids_until_reached() -> None:
    row = state(temperature=0.0, min_tokens=2)
    values = [9.0, 1.0, 0, 0, 0, 0, 0, 0]  # token 0 plays EOS
    assert sample(logits(values), [row]).token_ids == [1]
    assert sample(logits(values), [row]).token_ids == [1]
    assert sample(logits(values), [row]).token_ids == [0]


def test_logprobs_are_log_softmax_of_penalised_logits_before_temperature() -> None:
    rows = [state(temperature=0.0, logprobs=3), state(temperature=7.0, seed=1, logprobs=0), state()]
    out = sample(logits(BASE, BASE, BASE), rows)
    expected = torch.log_softmax(logits(BASE), dim=-1)[0]
    first = out.logprobs[0]
    assert first is not None
    assert first.top_ids == [0, 1, 2]
    assert first.top_logprobs == pytest.approx(expected[:3].tolist())
    assert first.logprob == pytest.approx(expected[0].item())
    second = out.logprobs[1]
    assert second is not None and second.top_ids == [] and second.logprob <= 0
    assert second.logprob == pytest.approx(expected[out.token_ids[1]].item())
    assert out.logprobs[2] is None
    assert math.isclose(sum(math.exp(x) for x in expected.tolist()), 1.0, rel_tol=1e-5)


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"min_p": -0.1}, "min_p"),
        ({"repetition_penalty": -1.0}, "repetition_penalty"),
        ({"presence_penalty": 2.01}, "presence_penalty"),
        ({"frequency_penalty": -2.01}, "frequency_penalty"),
    ],
)
def test_validation(params: dict[str, float], param: str) -> None:
    with pytest.raises(InvalidRequestError) as err:
        validate_sampling(SamplingParams(**params))  # type: ignore[arg-type]
    assert err.value.param == param


def test_logit_bias_is_added_to_its_row_only() -> None:
    biased = SamplingState(
        SamplingParams(temperature=0.0), vocab_size=4, logit_bias=((0, -100.0), (2, 5.0))
    )
    plain = SamplingState(SamplingParams(temperature=0.0), vocab_size=4)
    out = sample(logits([3.0, 1.0, 0.0, 2.0], [3.0, 1.0, 0.0, 2.0]), [biased, plain])
    assert out.token_ids == [2, 0]


@pytest.mark.parametrize("bias", [((4, 1.0),), ((-1, 1.0),), ((0, 100.5),), ((0, float("inf")),)])
def test_logit_bias_validation(bias: tuple[tuple[int, float], ...]) -> None:
    with pytest.raises(InvalidRequestError) as err:
        validate_logit_bias(bias, vocab_size=4)
    assert err.value.param == "logit_bias"
    validate_logit_bias(((3, -100.0), (0, 100.0)), vocab_size=4)
