"""`chatfleet eval mt-bench` end to end against a fake OpenAI-compatible server on a free port:
answers (two turns, per-category temperatures, many in flight), single and pairwise judgments in
FastChat's files, the table, resume, retries, leaderboard recording, and the clear errors (an
unreachable judge, a 401 from the judge, an unknown model) that keep what was done."""

from __future__ import annotations

import asyncio
import json
import re
import sys
import types
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from services.cli.launcher import free_port
from services.common.errors import UnavailableError
from services.eval.cli import main
from services.eval.data import load_bench
from services.eval.records import answer_path, answer_record, judgment_path, read_records
from tests.unit.eval_fakes import FakeOpenAI, serve, small_bench

# One question each of writing (temperature 0.7), reasoning (0.0, graded with a reference) and
# stem (0.1).
QUESTIONS = (81, 101, 141)
TEMPERATURES = {81: 0.7, 101: 0.0, 141: 0.1}


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return small_bench(tmp_path_factory.mktemp("bench"), QUESTIONS)


@pytest.fixture
def fake() -> Iterator[FakeOpenAI]:
    with serve(FakeOpenAI()) as running:
        yield running


@dataclass
class Run:
    code: int
    out: str
    err: str


def run_eval(
    capsys: pytest.CaptureFixture[str],
    url: str,
    output: Path,
    bench: Path,
    *args: str,
    env: dict[str, str] | None = None,
) -> Run:
    argv = [
        "mt-bench", "--gateway-url", url, "--output-dir", str(output), "--bench-data", str(bench),
        "--retry-backoff", "0", *args,
    ]  # fmt: skip
    code = main(argv, env or {})
    captured = capsys.readouterr()
    return Run(code, captured.out, captured.err)


def table_row(out: str, model: str) -> list[str]:
    """The cells of `model`'s row in the first table that has one."""
    for line in out.splitlines():
        cells = [cell.strip() for cell in re.split(r"[│┃]", line)[1:-1]]
        if cells and cells[0] == model:
            return cells
    raise AssertionError(f"no row for {model} in:\n{out}")


def test_answers_judgments_and_table(
    fake: FakeOpenAI, bench_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake.delay_s = 0.05
    run = run_eval(
        capsys, fake.url, tmp_path, bench_dir,
        "--mode", "both", "--baseline-model", "model-b", "--concurrency", "3",
    )  # fmt: skip
    assert run.code == 0, run.err
    # The embedding model is left out: the gateway's /api/models says it does not chat.
    assert {r["model"] for r in fake.requests} == {"model-a", "model-b"}
    assert 1 < fake.max_in_flight <= 3

    references = {q.question_id: q.reference for q in load_bench(bench_dir).questions}
    for model in ("model-a", "model-b"):
        answers = read_records(answer_path(tmp_path, model))
        assert [a["question_id"] for a in answers] == list(QUESTIONS)
        for answer in answers:
            assert answer["model_id"] == model
            turn_1, turn_2 = answer["choices"][0]["turns"]
            assert turn_1.startswith(f"{model} turn 1") and turn_2.startswith(f"{model} turn 2")
    for request in fake.answer_requests():
        messages = request["messages"]
        question = next(
            q for q in load_bench(bench_dir).questions if q.turns[0] == messages[0]["content"]
        )
        assert request["temperature"] == TEMPERATURES[question.question_id]
        if len(messages) == 3:  # turn 2 carries turn 1's question and answer
            assert messages[1]["role"] == "assistant"
            assert messages[1]["content"].startswith(f"{request['model']} turn 1")
    for request in fake.judge_requests():
        assert request["model"] == "model-a"  # the first served chat model
        assert request["temperature"] == 0.0

    single = read_records(judgment_path(tmp_path, "model-a", "single"))
    assert len(single) == 2 * 3 * 2
    prompts = {(r["question_id"], r["turn"]): r["judge"][1] for r in single}
    assert prompts[(81, 1)] == "single-v1" and prompts[(81, 2)] == "single-v1-multi-turn"
    assert prompts[(101, 1)] == "single-math-v1"
    assert prompts[(101, 2)] == "single-math-v1-multi-turn"
    reference = references[101]
    assert reference is not None
    for record in single:
        assert record["judge"][0] == "model-a" and record["score"] == 7
        if record["question_id"] == 101:
            assert reference[0] in record["user_prompt"]

    pairs = read_records(judgment_path(tmp_path, "model-a", "pair"))
    assert len(pairs) == 3 * 2
    for record in pairs:
        assert (record["model_1"], record["model_2"]) == ("model-a", "model-b")
        # The fake judge always picks A: after the swap the games disagree.
        assert (record["g1_winner"], record["g2_winner"]) == ("model_1", "model_2")
        # Game 2 shows the answers swapped.
        assert record["g1_user_prompt"].index("model-a turn") < record["g1_user_prompt"].index(
            "model-b turn"
        )
        assert record["g2_user_prompt"].index("model-b turn") < record["g2_user_prompt"].index(
            "model-a turn"
        )

    assert table_row(run.out, "model-a")[1:6] == ["7.00", "7.00", "7.00", "6", "0"]
    assert "reasoning" in run.out and "stem" in run.out  # the per-category table
    pair_row = table_row(run.out.split("pairwise")[1], "model-a")
    assert pair_row[1:4] == ["0", "0", "6"]  # inconsistent verdicts are ties
    assert "wall time" in run.out


def test_unparsed_judgments_are_recorded_and_counted(
    fake: FakeOpenAI, bench_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Turn 1 gets a rating; the multi-turn prompts get a judgment without one.
    fake.judge_reply = lambda system, user: "Fine." if "### User" in user else "Rating: [[6.5]]"
    run = run_eval(capsys, fake.url, tmp_path, bench_dir, "--models", "model-b")
    assert run.code == 0, run.err
    single = read_records(judgment_path(tmp_path, "model-a", "single"))
    assert sorted(r["score"] for r in single) == [-1, -1, -1, 6.5, 6.5, 6.5]
    assert all(r["judgment"] == "Fine." for r in single if r["score"] == -1)
    assert table_row(run.out, "model-b")[1:6] == ["6.50", "-", "6.50", "3", "3"]
    assert "3 judgment(s) gave no [[rating]]" in run.out


def test_resume_completes_a_partial_run(
    fake: FakeOpenAI, bench_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = answer_path(tmp_path, "model-a")
    path.parent.mkdir(parents=True)
    earlier = answer_record(81, "model-a", ["kept one", "kept two"])
    # An interrupted run: one answer written, the next one cut off mid-line.
    path.write_text(json.dumps(earlier) + "\n" + '{"question_id": 101, "answer_id": "x", "cho')
    run = run_eval(capsys, fake.url, tmp_path, bench_dir, "--models", "model-a")
    assert run.code == 0, run.err
    asked = {r["messages"][0]["content"] for r in fake.answer_requests()}
    questions = {q.question_id: q.turns[0] for q in load_bench(bench_dir).questions}
    assert asked == {questions[101], questions[141]}
    answers = read_records(path)
    assert [a["question_id"] for a in answers] == list(QUESTIONS)
    assert answers[0] == earlier
    assert "2 generated, 1 kept" in run.out

    # Everything is on disk now: a second run asks for nothing and prints the same table.
    fake.requests.clear()
    again = run_eval(capsys, fake.url, tmp_path, bench_dir, "--models", "model-a")
    assert again.code == 0, again.err
    assert fake.requests == []
    assert table_row(again.out, "model-a") == table_row(run.out, "model-a")
    assert len(read_records(judgment_path(tmp_path, "model-a", "single"))) == 6


@pytest.mark.parametrize("status", [429, 500, 503])
def test_retries_with_backoff(
    status: int,
    fake: FakeOpenAI,
    bench_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    fake.failures = [status, status]
    run = run_eval(capsys, fake.url, tmp_path, bench_dir, "--models", "model-a", "--retries", "3")
    assert run.code == 0, run.err
    assert len(read_records(answer_path(tmp_path, "model-a"))) == 3
    assert len(fake.answer_requests()) == 3 * 2 + 2


def test_a_model_that_cannot_chat_is_skipped_with_a_note(
    fake: FakeOpenAI, bench_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake.capabilities = False  # a plain OpenAI server: the list does not say who chats
    fake.chat_models = ["model-a"]
    run = run_eval(capsys, fake.url, tmp_path, bench_dir)
    assert run.code == 0, run.err
    assert "skipped embed-x: it cannot chat" in run.out
    assert not answer_path(tmp_path, "embed-x").exists()
    # The judge is a model that answered, not the embedding model listed first.
    assert {r["model"] for r in fake.judge_requests()} == {"model-a"}


def test_unreachable_judge_is_a_clear_error_and_keeps_the_answers(
    fake: FakeOpenAI, bench_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    judge_url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    run = run_eval(
        capsys, fake.url, tmp_path, bench_dir,
        "--models", "model-a", "--judge-url", judge_url, "--judge-model", "gpt-4", "--retries", "2",
    )  # fmt: skip
    assert run.code == 1
    assert f"cannot reach the judge at {judge_url}/v1/chat/completions" in run.err
    assert "answers are kept" in run.err
    assert "Traceback" not in run.err
    assert len(read_records(answer_path(tmp_path, "model-a"))) == 3


def test_judge_rejecting_the_key_is_a_clear_error_and_keeps_the_answers(
    fake: FakeOpenAI, bench_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with serve(FakeOpenAI(chat_models=["judge-model"], api_key="right")) as judge:
        run = run_eval(
            capsys, fake.url, tmp_path, bench_dir,
            "--models", "model-a", "--judge-url", judge.url, "--judge-model", "judge-model",
            "--judge-api-key-env", "JUDGE_KEY", env={"JUDGE_KEY": "wrong"},
        )  # fmt: skip
        assert judge.requests  # asked, and refused
    assert run.code == 1
    assert "the judge rejected the API key (401)" in run.err
    assert "$JUDGE_KEY" in run.err
    assert "wrong" not in run.err  # the key itself is never printed
    assert "answers are kept" in run.err
    assert len(read_records(answer_path(tmp_path, "model-a"))) == 3
    assert not judgment_path(tmp_path, "judge-model", "single").exists()


def test_judge_with_the_right_key_from_its_env_variable(
    fake: FakeOpenAI, bench_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with serve(FakeOpenAI(chat_models=["judge-model"], api_key="right")) as judge:
        run = run_eval(
            capsys, fake.url, tmp_path, bench_dir, "--models", "model-a", "--judge-url", judge.url,
            env={"OPENAI_API_KEY": "right"},
        )  # fmt: skip
        assert run.code == 0, run.err
        assert {r["model"] for r in judge.requests} == {"judge-model"}
    assert len(read_records(judgment_path(tmp_path, "judge-model", "single"))) == 6
    assert fake.judge_requests() == []


def test_unknown_model_lists_the_served_ones_and_generates_nothing(
    fake: FakeOpenAI, bench_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = run_eval(capsys, fake.url, tmp_path, bench_dir, "--models", "model-a,nope")
    assert run.code == 1
    assert "unknown model 'nope'" in run.err
    assert "embed-x, model-a, model-b" in run.err
    assert fake.requests == []
    assert not (tmp_path / "model_answer").exists()


def test_unreachable_gateway(
    bench_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    run = run_eval(capsys, url, tmp_path, bench_dir, "--retries", "1")
    assert run.code == 1
    assert f"cannot reach the gateway at {url}/v1/models" in run.err


def test_pairwise_needs_a_baseline(
    bench_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        run_eval(capsys, "http://127.0.0.1:1", tmp_path, bench_dir, "--mode", "pairwise")
    assert exited.value.code == 2
    assert "--baseline-model" in capsys.readouterr().err


@dataclass(frozen=True)
class FakeScore:
    model: str
    judge: str
    score: float
    questions: int
    unparsed: int


class FakeStore:
    def __init__(self, url: str) -> None:
        self.url = url
        self.recorded: list[FakeScore] = []
        self.closed = False

    async def record_mtbench(self, scores: Sequence[FakeScore]) -> None:
        self.recorded.extend(scores)

    async def close(self) -> None:
        self.closed = True


def test_scores_go_to_the_leaderboard_store(
    fake: FakeOpenAI,
    bench_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """services.leaderboard.store's interface (MTBenchScore, open_store, record_mtbench, close),
    stood in for by a fake so this test does not depend on a database."""
    stores: list[FakeStore] = []

    async def open_store(url: str) -> FakeStore:
        stores.append(FakeStore(url))
        return stores[-1]

    module: Any = types.ModuleType("services.leaderboard.store")
    module.MTBenchScore, module.open_store = FakeScore, open_store
    monkeypatch.setitem(sys.modules, "services.leaderboard.store", module)
    fake.judge_reply = lambda system, user: "Rating: [[4]]" if "### User" in user else "no rating"
    url = f"sqlite:///{tmp_path / 'board.db'}"
    run = run_eval(capsys, fake.url, tmp_path, bench_dir, "--leaderboard-url", url)
    assert run.code == 0, run.err
    (store,) = stores
    assert store.url == url and store.closed
    assert sorted(store.recorded, key=lambda s: s.model) == [
        FakeScore("model-a", "model-a", 4.0, 3, 3),
        FakeScore("model-b", "model-a", 4.0, 3, 3),
    ]


def test_scores_in_the_real_sqlite_store(
    fake: FakeOpenAI, bench_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The same through services.leaderboard.store itself, on a SQLite file."""
    store_module = pytest.importorskip("services.leaderboard.store")
    url = f"sqlite:///{tmp_path / 'board.db'}"
    run = run_eval(capsys, fake.url, tmp_path, bench_dir, "--leaderboard-url", url)
    assert run.code == 0, run.err

    async def recorded() -> list[Any]:
        store = await store_module.open_store(url)
        try:
            return list(await store.mtbench_scores())
        finally:
            await store.close()

    scores = asyncio.run(recorded())
    assert sorted((s.model, s.judge, s.score, s.questions, s.unparsed) for s in scores) == [
        ("model-a", "model-a", 7.0, 6, 0),
        ("model-b", "model-a", 7.0, 6, 0),
    ]


def test_a_store_that_fails_is_a_clear_error_and_keeps_the_judgments(
    fake: FakeOpenAI,
    bench_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def open_store(url: str) -> FakeStore:
        raise UnavailableError("cannot open PostgreSQL at db:5432: connection refused")

    module: Any = types.ModuleType("services.leaderboard.store")
    module.MTBenchScore, module.open_store = FakeScore, open_store
    monkeypatch.setitem(sys.modules, "services.leaderboard.store", module)
    run = run_eval(capsys, fake.url, tmp_path, bench_dir, "--leaderboard-url", "postgresql://db/x")
    assert run.code == 1
    assert "could not record the MT-bench scores in the leaderboard" in run.err
    assert "connection refused" in run.err and "judgments are kept" in run.err
    assert len(read_records(judgment_path(tmp_path, "model-a", "single"))) == 12
