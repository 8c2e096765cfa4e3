"""Reading instruction data into one normalized form: a list of chat messages per example.

Accepted records (one JSON object per line of a ``.jsonl`` file):

- Alpaca: ``{"instruction": ..., "input": ... (optional), "output": ...}``
- plain pairs: ``{"input": ..., "output": ...}``
- conversations as lists of turns: ``{"messages": [{"role": "user"|"assistant"|"system", "content": ...}, ...]}``
  (OpenAI / Hugging Face chat style; OpenAssistant's ``"prompter"`` is a user) or ShareGPT's
  ``{"conversations": [{"from": "human"|"gpt"|"system", "value": ...}, ...]}``
- OpenAssistant-Guanaco text (the paper's main data set): ``{"text": "### Human: ...### Assistant: ..."}``

and the chatterbot-corpus YAML files (``conversations:`` lists of alternating question/answer strings).

A malformed record raises :class:`MalformedRecordError` naming the file and line. Harmless irregularities —
an unanswered last turn, a one-line chatterbot conversation — are counted in a :class:`DataReport`, never lost
silently.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ROLE_ALIASES = {
    "user": "user", "human": "user", "prompter": "user",
    "assistant": "assistant", "gpt": "assistant", "bot": "assistant", "model": "assistant", "chatgpt": "assistant",
    "system": "system",
}


class MalformedRecordError(ValueError):
    """A record that cannot be read; the message starts with ``file:line:``."""

    def __init__(self, source: str, message: str):
        super().__init__(f"{source}: {message}")
        self.source = source


@dataclass
class Example:
    """One training example: ``messages`` (role "system" | "user" | "assistant", content str), ending with an
    assistant turn; ``source`` ("file:line") for messages and reports; ``alpaca`` (instruction, input) when the
    record was Alpaca, so the template-less fallback can use the exact Alpaca prompt."""

    messages: list[dict]
    source: str
    alpaca: tuple[str, str] | None = None


@dataclass
class DataReport:
    """What happened to the records: how many were read and kept, and each reason something was left out
    (``dropped``: whole examples, ``trimmed``: turns), with the first few sources for each reason."""

    records: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    trimmed: Counter = field(default_factory=Counter)
    where: dict = field(default_factory=dict)

    def drop(self, reason: str, source: str) -> None:
        self.dropped[reason] += 1
        self._note(reason, source)

    def trim(self, reason: str, source: str) -> None:
        self.trimmed[reason] += 1
        self._note(reason, source)

    def _note(self, reason: str, source: str) -> None:
        sources = self.where.setdefault(reason, [])
        if len(sources) < 5:
            sources.append(source)

    @property
    def n_dropped(self) -> int:
        return sum(self.dropped.values())

    def summary(self) -> str:
        parts = [f"{self.records} records read, {self.kept} examples kept"]
        for reason, n in sorted(self.dropped.items()):
            parts.append(f"{n} dropped: {reason} (e.g. {', '.join(self.where.get(reason, []))})")
        for reason, n in sorted(self.trimmed.items()):
            parts.append(f"{n} trimmed: {reason} (e.g. {', '.join(self.where.get(reason, []))})")
        return "; ".join(parts)

    def merge(self, other: DataReport) -> None:
        self.records += other.records
        self.kept += other.kept
        self.dropped.update(other.dropped)
        self.trimmed.update(other.trimmed)
        for k, v in other.where.items():
            self.where[k] = (self.where.get(k, []) + v)[:5]


# ------------------------------------------------------------------------------------------------ records
def _text(value, what: str, source: str) -> str:
    if not isinstance(value, str):
        raise MalformedRecordError(source, f"{what} must be a string, got {type(value).__name__}")
    return value


def _turns(turns, source: str, role_key: str, content_key: str, report: DataReport) -> list[dict]:
    if not isinstance(turns, list) or not turns:
        raise MalformedRecordError(source, "a conversation must be a non-empty list of turns")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or role_key not in turn or content_key not in turn:
            raise MalformedRecordError(source, f"turn {i} must be an object with {role_key!r} and {content_key!r}")
        role = ROLE_ALIASES.get(str(turn[role_key]).lower())
        if role is None:
            raise MalformedRecordError(source, f"turn {i} has unknown role {turn[role_key]!r} "
                                               f"(known: {sorted(ROLE_ALIASES)})")
        messages.append({"role": role, "content": _text(turn[content_key], f"turn {i}'s {content_key!r}", source)})
    return _check_roles(messages, source, report)


def _check_roles(messages: list[dict], source: str, report: DataReport) -> list[dict]:
    """System turns first, then user and assistant alternating from a user turn; an unanswered last user turn
    is trimmed (and counted)."""
    i = 0
    while i < len(messages) and messages[i]["role"] == "system":
        i += 1
    expected = "user"
    for j in range(i, len(messages)):
        if messages[j]["role"] != expected:
            raise MalformedRecordError(source, f"turn {j} is {messages[j]['role']!r} where {expected!r} was expected "
                                               "(after system turns, user and assistant must alternate)")
        expected = "assistant" if expected == "user" else "user"
    if messages and messages[-1]["role"] == "user":
        messages = messages[:-1]
        report.trim("unanswered last user turn", source)
    if not any(m["role"] == "assistant" for m in messages):
        raise MalformedRecordError(source, "the conversation has no assistant turn to learn from")
    return messages


_GUANACO = re.compile(r"### (Human|Assistant):")


def _guanaco(text: str, source: str, report: DataReport) -> list[dict]:
    parts = _GUANACO.split(text)
    if len(parts) < 3 or parts[0].strip():
        raise MalformedRecordError(source, "'text' must be a '### Human: ... ### Assistant: ...' dialogue")
    messages = [{"role": "user" if who == "Human" else "assistant", "content": body.strip()}
                for who, body in zip(parts[1::2], parts[2::2], strict=True)]
    return _check_roles(messages, source, report)


def record_to_example(record, source: str, report: DataReport | None = None) -> Example:
    """Normalize one parsed record (see the module docstring for the formats)."""
    report = report if report is not None else DataReport()
    if not isinstance(record, dict):
        raise MalformedRecordError(source, f"a record must be a JSON object, got {type(record).__name__}")
    if "messages" in record:
        return Example(_turns(record["messages"], source, "role", "content", report), source)
    if "conversations" in record:
        turns = record["conversations"]
        sharegpt = isinstance(turns, list) and turns and isinstance(turns[0], dict) and "from" in turns[0]
        keys = ("from", "value") if sharegpt else ("role", "content")
        return Example(_turns(turns, source, *keys, report), source)
    if "instruction" in record:
        if "output" not in record:
            raise MalformedRecordError(source, "an Alpaca record needs 'output'")
        instruction = _text(record["instruction"], "'instruction'", source)
        extra = _text(record.get("input") or "", "'input'", source)
        output = _text(record["output"], "'output'", source)
        user = f"{instruction}\n\n{extra}" if extra else instruction
        return Example([{"role": "user", "content": user}, {"role": "assistant", "content": output}], source,
                       alpaca=(instruction, extra))
    if "input" in record and "output" in record:
        return Example([{"role": "user", "content": _text(record["input"], "'input'", source)},
                        {"role": "assistant", "content": _text(record["output"], "'output'", source)}], source)
    if "text" in record:
        return Example(_guanaco(_text(record["text"], "'text'", source), source, report), source)
    raise MalformedRecordError(
        source, f"unrecognised record with keys {sorted(record)}; expected 'instruction'/'input'/'output' "
                "(Alpaca), 'input'/'output', 'messages', 'conversations', or a '### Human:' 'text'")


# ------------------------------------------------------------------------------------------------ files
def _check_on_malformed(on_malformed: str) -> None:
    if on_malformed not in ("error", "drop"):
        raise ValueError(f"on_malformed must be 'error' or 'drop', got {on_malformed!r}")


def read_jsonl(path: str | os.PathLike, report: DataReport | None = None, on_malformed: str = "error"
               ) -> list[Example]:
    """Every record of a JSON-lines file as an :class:`Example` (blank lines are skipped). A malformed record
    raises :class:`MalformedRecordError` ("file:line: ..."), or with ``on_malformed="drop"`` is counted in the
    report under "malformed record" and skipped."""
    _check_on_malformed(on_malformed)
    report = report if report is not None else DataReport()
    path = Path(path)
    examples = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            source = f"{path}:{lineno}"
            report.records += 1
            try:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise MalformedRecordError(source, f"invalid JSON ({e.msg} at column {e.colno})") from None
                examples.append(record_to_example(record, source, report))
            except MalformedRecordError as e:
                if on_malformed == "error":
                    raise
                report.drop("malformed record", str(e))
    report.kept += len(examples)
    return examples


def read_chatterbot_yaml(path: str | os.PathLike, report: DataReport | None = None, on_malformed: str = "error",
                        display_name: str | None = None) -> list[Example]:
    """One chatterbot-corpus YAML file: each entry of ``conversations:`` is a list of alternating user and
    assistant strings. One-line conversations are dropped and an unanswered last line trimmed (both counted);
    a malformed entry is an error naming file and line, or, with ``on_malformed="drop"``, counted and skipped."""
    _check_on_malformed(on_malformed)
    path = Path(path)
    name = display_name or str(path)
    try:
        import yaml
    except ImportError as e:  # pragma: no cover - PyYAML comes with the demo extra
        raise ImportError("reading chatterbot-corpus YAML needs PyYAML: pip install pyyaml") from e
    report = report if report is not None else DataReport()
    text = path.read_text(encoding="utf-8")
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        line = getattr(getattr(e, "problem_mark", None), "line", -1) + 1
        raise MalformedRecordError(f"{name}:{line}", f"invalid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(root, yaml.MappingNode):
        raise MalformedRecordError(f"{name}:1", "expected a mapping with a 'conversations' list")
    convs = next((v for k, v in root.value if k.value == "conversations"), None)
    if not isinstance(convs, yaml.SequenceNode):
        raise MalformedRecordError(f"{name}:1", "expected a 'conversations:' list")
    examples = []
    for node in convs.value:
        source = f"{name}:{node.start_mark.line + 1}"
        report.records += 1
        try:
            if not isinstance(node, yaml.SequenceNode):
                raise MalformedRecordError(source, "a conversation must be a list of strings")
            lines = []
            for item in node.value:
                if not isinstance(item, yaml.ScalarNode):
                    raise MalformedRecordError(f"{name}:{item.start_mark.line + 1}", "a conversation line must be text")
                lines.append(str(item.value).strip())
        except MalformedRecordError as e:
            if on_malformed == "error":
                raise
            report.drop("malformed record", str(e))
            continue
        if len(lines) < 2:
            report.drop("chatterbot conversation with a single line", source)
            continue
        messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": s} for i, s in enumerate(lines)]
        examples.append(Example(_check_roles(messages, source, report), source))
    report.kept += len(examples)
    return examples


def chatterbot_data_dir() -> Path | None:
    """The ``data`` folder of the installed ``chatterbot-corpus`` package, or None if it is not installed."""
    import importlib.util

    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        return None
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    return data if data.is_dir() else None


def load_chatterbot_corpus(language: str = "english", categories: list[str] | None = None,
                           report: DataReport | None = None, on_malformed: str = "drop") -> list[Example]:
    """The question/answer pairs of the chatterbot-corpus package (PyPI ``chatterbot-corpus``, BSD-3),
    e.g. ``load_chatterbot_corpus("english", ["greetings", "ai"])``; files in sorted order.

    The shipped corpus has a flaw we cannot fix (chatterbot-corpus 1.3.3, ``english/trivia.yml`` line 35: a
    missing "- " turns one question/answer pair into a single string), so by default malformed entries are
    dropped and counted in the report with their file and line; ``on_malformed="error"`` raises instead."""
    data = chatterbot_data_dir()
    if data is None:
        raise ImportError("the chatterbot corpus is not installed: pip install 'qlora[demo]' "
                          "(or pip install chatterbot-corpus)")
    folder = data / language
    if not folder.is_dir():
        raise ValueError(f"no chatterbot corpus for {language!r}; available: {sorted(p.name for p in data.iterdir())}")
    files = sorted(folder.glob("*.yml"))
    if categories is not None:
        wanted = set(categories)
        files = [f for f in files if f.stem in wanted]
        missing = wanted - {f.stem for f in files}
        if missing:
            raise ValueError(f"no chatterbot categories {sorted(missing)} for {language!r}; "
                             f"available: {sorted(f.stem for f in folder.glob('*.yml'))}")
    report = report if report is not None else DataReport()
    examples = []
    for f in files:
        examples += read_chatterbot_yaml(f, report, on_malformed, display_name=f"chatterbot_corpus/{language}/{f.name}")
    return examples


def load_examples(spec: str | os.PathLike, report: DataReport | None = None, on_malformed: str | None = None
                  ) -> list[Example]:
    """Examples from ``spec``: a ``.jsonl`` file, a chatterbot-style ``.yml``/``.yaml`` file, a folder of those,
    or ``"chatterbot"`` / ``"chatterbot:<language>"`` / ``"chatterbot:<language>:<cat1>,<cat2>"``.
    ``on_malformed``: ``"error"`` or ``"drop"`` (counted in the report); None: each source's own default (a user's
    file is an error, the shipped corpus's few irregular entries are dropped)."""
    report = report if report is not None else DataReport()
    if on_malformed is not None:
        _check_on_malformed(on_malformed)
    s = str(spec)
    if s == "chatterbot" or s.startswith("chatterbot:"):
        parts = s.split(":")
        language = parts[1] if len(parts) > 1 and parts[1] else "english"
        categories = parts[2].split(",") if len(parts) > 2 and parts[2] else None
        return load_chatterbot_corpus(language, categories, report, on_malformed or "drop")
    path = Path(spec)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".jsonl", ".yml", ".yaml"))
        return [ex for f in files for ex in load_examples(f, report, on_malformed)]
    if path.suffix == ".jsonl":
        return read_jsonl(path, report, on_malformed or "error")
    if path.suffix in (".yml", ".yaml"):
        return read_chatterbot_yaml(path, report, on_malformed or "error")
    raise ValueError(f"cannot read {s!r}: expected a .jsonl or .yml file, a folder, or 'chatterbot[:language]'")
