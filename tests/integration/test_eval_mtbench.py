"""`chatfleet eval mt-bench --first-n 2` end to end on the real stack: the default chat model
answers and judges. SmolLM2-135M rarely writes a [[rating]], so this is also the unparsed path:
those judgments are on disk with score -1 and counted in the table, and the run succeeds."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from services.eval.records import answer_path, judgment_path, read_records
from tests.integration.conftest import CHAT_MODEL, EMBEDDING_MODEL, Stack, service_env

pytestmark = pytest.mark.integration


def test_mt_bench_first_two_questions(stack: Stack, tmp_path: Path) -> None:
    env = service_env() | {"COLUMNS": "200"}  # the table's rows on one line each
    done = subprocess.run(
        [
            sys.executable, "-m", "services.cli.main", "eval", "mt-bench",
            "--gateway-url", stack.gateway_url, "--first-n", "2", "--max-tokens", "64",
            "--judge-max-tokens", "64", "--output-dir", str(tmp_path),
        ],
        capture_output=True, text=True, timeout=240, env=env, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr

    answers = read_records(answer_path(tmp_path, CHAT_MODEL))
    assert [a["question_id"] for a in answers] == [81, 82]  # MT-bench's first two
    for answer in answers:
        assert answer["model_id"] == CHAT_MODEL
        turns = answer["choices"][0]["turns"]
        assert len(turns) == 2 and all(turn.strip() for turn in turns)
    # The embedding model does not chat: it was not asked.
    assert not answer_path(tmp_path, EMBEDDING_MODEL).exists()

    # The default judge is the first served chat model: the default model itself.
    judgments = read_records(judgment_path(tmp_path, CHAT_MODEL, "single"))
    assert sorted((j["question_id"], j["turn"]) for j in judgments) == [
        (81, 1), (81, 2), (82, 1), (82, 2)
    ]  # fmt: skip
    for judgment in judgments:
        assert judgment["model"] == CHAT_MODEL
        assert judgment["judge"] == [
            CHAT_MODEL,
            "single-v1" if judgment["turn"] == 1 else "single-v1-multi-turn",
        ]
        assert judgment["score"] == -1 or 1 <= judgment["score"] <= 10
    unparsed = sum(1 for j in judgments if j["score"] == -1)

    row = next(
        line
        for line in done.stdout.splitlines()
        if re.match(rf"\s*│\s*{re.escape(CHAT_MODEL)}\s*│", line)
    )
    cells = [cell.strip() for cell in row.split("│")[1:-1]]
    assert cells[0] == CHAT_MODEL
    rated_cell, unparsed_cell = cells[4], cells[5]
    assert int(unparsed_cell) == unparsed
    assert int(rated_cell) == len(judgments) - unparsed
    assert "wall time" in done.stdout
