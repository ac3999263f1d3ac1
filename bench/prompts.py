"""The fixed prompt sets the benchmark sends: deterministic texts of different lengths, so every run
(and the HF baselines) sees exactly the same input tokens."""

from __future__ import annotations

import json
from pathlib import Path

# Notes to summarise: the long prompts are an instruction plus the first k of these sentences.
_NOTES = (
    "The lighthouse on Gull Rock was built in 1871 from granite quarried on the mainland.",
    "Its lamp burned whale oil at first, then kerosene, and was electrified in 1934.",
    "Three keepers lived on the rock in rotation, each serving four weeks before a week ashore.",
    "Supplies came by boat every Thursday when the sea allowed, which in winter was rarely.",
    "The keepers kept a log of every ship that passed, the weather at each watch, and the state "
    "of the lamp, the lens and the clockwork that turned it.",
    "In the great storm of 1903 waves broke over the gallery, ninety feet above the low-water "
    "mark, and shattered two panes of the lantern room.",
    "The keeper on duty, Thomas Hale, held a canvas over the gap for six hours so that the light "
    "would not go out, and was later given a medal by the Board of Trade.",
    "A fog signal was added in 1912: a compressed-air siren that sounded two blasts every minute "
    "and could be heard eleven miles away in calm weather.",
    "The families of the keepers lived in cottages on the headland, where the children went to a "
    "one-room school and learned to read the flags that signalled news from the rock.",
    "During the Second World War the light was dimmed and shown only when convoys were expected, "
    "on orders that came by telephone through a cable laid across the seabed.",
    "The cable failed twice in the winter of 1942, and messages were sent by carrier pigeon until "
    "divers could repair it in the spring.",
    "After the war a helicopter pad was built on the rock, and relief crews no longer had to wait "
    "for calm seas to change watch.",
    "The station was automated in 1989; the last keepers left in a small ceremony attended by the "
    "families of the men who had served there over more than a century.",
    "Today the lamp is a ring of light-emitting diodes powered by solar panels and a battery bank, "
    "monitored from a control room two hundred miles away.",
    "The old keepers' logs are kept in the county archive, and historians use them to study the "
    "weather and the shipping of the North Sea over a hundred and twenty years.",
    "Volunteers from the village restored the cottages as a museum, with the original lens on "
    "display and a room that shows how the keepers cooked, slept and passed the long evenings.",
    "Visitors can still take a boat to the rock in summer, climb the one hundred and forty-two "
    "steps to the lantern room, and look out over the reef that wrecked so many ships before "
    "the light was built.",
    "Local fishermen say that on stormy nights the old fog signal can still be heard, although it "
    "was removed and sold for scrap in 1991.",
)

_SUMMARISE = "Summarise the following notes about a lighthouse in a few paragraphs.\n\n"
_QUESTIONS = (
    "Write a story about a lighthouse keeper.",
    "Explain how a steam engine works, step by step.",
    "What are the main causes of ocean tides?",
    "Describe a busy harbour at dawn.",
    "List ten uses for a ball of string and explain each one.",
    "Write a letter from a sailor to his family at home.",
    "Why is the sky blue? Answer for a curious ten-year-old.",
    "Give a recipe for fish soup and explain every step.",
)


def _summarise(sentences: int) -> str:
    return _SUMMARISE + " ".join(_NOTES[:sentences])


PROMPT_SETS: dict[str, tuple[str, ...]] = {
    # 8 to 577 prompt tokens (SmolLM2 tokenizer): a mix of chat-like questions and longer documents.
    "mixed": (
        _QUESTIONS[0],
        _QUESTIONS[1],
        _summarise(1),
        _summarise(3),
        _summarise(6),
        _summarise(10),
        _summarise(14),
        _summarise(len(_NOTES)),
    ),
    # Decode-dominated: every prompt is a one-line question.
    "short": _QUESTIONS,
    # Prefill-heavy (~580 tokens each): all the notes behind a different instruction.
    "long": tuple(
        f"{question}\nUse these notes as background.\n\n{' '.join(_NOTES)}"
        for question in _QUESTIONS
    ),
}


def load_prompt_set(name_or_path: str) -> tuple[str, ...]:
    """A built-in set by name, or a JSON file holding a list of prompt strings."""
    if name_or_path in PROMPT_SETS:
        return PROMPT_SETS[name_or_path]
    path = Path(name_or_path)
    if not path.is_file():
        raise ValueError(
            f"--prompt-set must be one of {', '.join(PROMPT_SETS)} or a JSON file of strings, "
            f"got {name_or_path!r}"
        )
    try:
        prompts = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read prompt set {path}: {exc}") from exc
    if not (
        isinstance(prompts, list) and prompts and all(isinstance(p, str) and p for p in prompts)
    ):
        raise ValueError(f"prompt set {path} must be a non-empty JSON list of non-empty strings")
    return tuple(prompts)


# The structured-output level: each question asks for the object the schema describes, so the
# unconstrained twin (same messages, no response_format) writes answers of a similar kind.
STRUCTURED_SCHEMA: dict[str, object] = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 60},
        "summary": {"type": "string", "maxLength": 240},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 3},
    },
    "required": ["title", "summary", "tags"],
    "additionalProperties": False,
}
STRUCTURED_PROMPTS: tuple[str, ...] = tuple(
    f"{question}\nReply with a JSON object holding a title, a one-sentence summary and up to "
    "three tags."
    for question in _QUESTIONS
)


# The multi-turn level: user u opens with question u (mod the set) and then asks the follow-ups in
# order, shifted by u, so the conversations differ from their first token on (no prefix is shared
# between users beyond the system prompt) and every run sends the same texts.
_FOLLOW_UPS = (
    "Can you say more about that?",
    "Give me a concrete example.",
    "What would a beginner most often get wrong here?",
    "Summarise what you said so far in three sentences.",
    "How would you explain it to a sailor on a long voyage?",
    "Which part of that is the most surprising, and why?",
    "Now tell it as a short story.",
    "What questions should I ask next?",
    "List the key terms you used and define each one.",
)


def multiturn_message(user: int, turn: int) -> str:
    """The user's message at a turn (both 0-based): a question to open, then follow-ups."""
    if user < 0 or turn < 0:
        raise ValueError(f"user and turn must be 0 or more, got {user} and {turn}")
    if turn == 0:
        return f"{_QUESTIONS[user % len(_QUESTIONS)]} (conversation {user + 1})"
    return _FOLLOW_UPS[(turn - 1 + user) % len(_FOLLOW_UPS)]
