"""Reading instruction data into one normalized form: a list of chat messages per example.

Accepted records (one JSON object per line of a ``.jsonl`` file, a ``.json`` file's array of them, or the rows of a
``.parquet`` file, as the Hugging Face Hub serves data sets):

- Alpaca: ``{"instruction": ..., "input": ... (optional), "output": ...}``
- plain pairs: ``{"input": ..., "output": ...}``
- conversations as lists of turns: ``{"messages": [{"role": "user"|"assistant"|"system", "content": ...}, ...]}``
  (OpenAI / Hugging Face chat style; OpenAssistant's ``"prompter"`` is a user) or ShareGPT's
  ``{"conversations": [{"from": "human"|"gpt"|"system", "value": ...}, ...]}``; with tool calls as OpenAI, TRL and
  transformers write them: an assistant turn's ``"tool_calls"`` (its content may then be empty or null), the
  results as ``"tool"`` turns, and the record's ``"tools"`` (the functions' JSON schemas, handed to the chat
  template, as TRL's ``tools`` column is)
- prompt-completion (TRL's SFT format): ``{"prompt": ..., "completion": ...}``, both strings (a user turn and
  its answer) or both lists of messages (the prompt's turns, then the completion's assistant turn); only the
  completion is trained, as TRL trains it, even where the prompt holds earlier assistant turns
- OpenAssistant-Guanaco text (the paper's main data set): ``{"text": "### Human: ...### Assistant: ..."}``

and the chatterbot-corpus YAML files (``conversations:`` lists of alternating question/answer strings).

A malformed record raises :class:`MalformedRecordError` naming the file and line. Harmless irregularities —
an unanswered last turn, a one-line chatterbot conversation, a key the record's format does not read (metadata
such as ``id``), a file of a folder that is not data — are counted in a :class:`DataReport`, never lost silently.
"""

from __future__ import annotations

import codecs
import difflib
import functools
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
    "tool": "tool", "function": "tool", "observation": "tool", "ipython": "tool",  # Llama 3.1 writes "ipython"
}
#: a turn's keys handed to the chat template besides role and content: tool calls and their results' ids, and the
#: reasoning of Qwen3/DeepSeek-R1-style templates
TURN_EXTRAS = ("tool_calls", "tool_call_id", "name", "reasoning_content")


class MalformedRecordError(ValueError):
    """A record that cannot be read; the message starts with ``file:line:``."""

    def __init__(self, source: str, message: str):
        super().__init__(f"{source}: {message}")
        self.source = source


@dataclass
class Example:
    """One training example: ``messages`` (role "system" | "user" | "assistant" | "tool", content str; an assistant
    turn's ``tool_calls`` and the other ``TURN_EXTRAS`` kept), ending with an assistant turn; ``source``
    ("file:line") for messages and reports; ``alpaca`` (instruction, input) when the record was Alpaca, so the
    template-less fallback can use the exact Alpaca prompt; ``tools``: the functions the conversation may call
    (JSON schemas, handed to the chat template), or None. ``last_turn_only``: only the
    last assistant turn is trained, the turns before it are its prompt, rendered as a whole as the chat template
    renders history when the model answers that turn (a turn of a conversation split by ``pipeline.split_turns``,
    or a prompt-completion record)."""

    messages: list[dict]
    source: str
    alpaca: tuple[str, str] | None = None
    last_turn_only: bool = False
    tools: list | None = None


@dataclass
class DataReport:
    """What happened to the records: how many were read and kept, and each reason something was left out
    (``dropped``: whole examples, ``trimmed``: turns, ``ignored``: keys of kept records that their format does not
    read, by key, ``skipped``: files of a data folder that were not read), with the first few sources for each.
    ``split``: conversations split into one example per assistant turn (``pipeline.split_turns``), and
    ``split_examples`` the examples they became, so that ``records + split_examples - split == kept + n_dropped``."""

    records: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    trimmed: Counter = field(default_factory=Counter)
    where: dict = field(default_factory=dict)
    ignored: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)
    split: int = 0
    split_examples: int = 0

    def drop(self, reason: str, source: str) -> None:
        self.dropped[reason] += 1
        self._note(reason, source)

    def trim(self, reason: str, source: str) -> None:
        self.trimmed[reason] += 1
        self._note(reason, source)

    def ignore(self, key: str, source: str) -> None:
        self.ignored[key] += 1
        self._note(_ignored_reason(key), source)

    def skip(self, reason: str, path: str) -> None:
        self.skipped[reason] += 1
        self._note(reason, path)

    def split_into(self, n: int, source: str) -> None:
        self.split += 1
        self.split_examples += n
        self._note(SPLIT_REASON, source)

    def _note(self, reason: str, source: str) -> None:
        sources = self.where.setdefault(reason, [])
        if len(sources) < 5:
            sources.append(source)

    @property
    def n_dropped(self) -> int:
        return sum(self.dropped.values())

    @property
    def left_out(self) -> bool:
        """Whether anything read was not used whole: an example dropped, a key ignored, a file skipped (a trimmed
        unanswered turn is not: nothing to learn from was lost)."""
        return bool(self.n_dropped or self.ignored or self.skipped)

    @property
    def noteworthy(self) -> bool:
        """Whether the report says more than "read and kept": something left out, or a conversation split."""
        return self.left_out or bool(self.split)

    def summary(self) -> str:
        def eg(reason):
            return ", ".join(self.where.get(reason, []))

        parts = [f"{self.records} records read, {self.kept} examples kept"]
        for reason, n in sorted(self.skipped.items()):
            parts.append(f"{n} skipped: {reason} (e.g. {eg(reason)})")
        for reason, n in sorted(self.dropped.items()):
            parts.append(f"{n} dropped: {reason} (e.g. {eg(reason)})")
        if self.split:
            parts.append(f"{self.split} conversation{'' if self.split == 1 else 's'} split into "
                         f"{self.split_examples} examples, {SPLIT_REASON} (e.g. {eg(SPLIT_REASON)})")
        for reason, n in sorted(self.trimmed.items()):
            parts.append(f"{n} trimmed: {reason} (e.g. {eg(reason)})")
        for key, n in sorted(self.ignored.items()):
            reason = _ignored_reason(key)
            parts.append(f"{reason} in {n} record{'' if n == 1 else 's'} (e.g. {eg(reason)})")
        return "; ".join(parts)

    def merge(self, other: DataReport) -> None:
        self.records += other.records
        self.kept += other.kept
        self.dropped.update(other.dropped)
        self.trimmed.update(other.trimmed)
        self.ignored.update(other.ignored)
        self.skipped.update(other.skipped)
        self.split += other.split
        self.split_examples += other.split_examples
        for k, v in other.where.items():
            self.where[k] = (self.where.get(k, []) + v)[:5]


#: why a conversation becomes one example per assistant turn (``pipeline.split_turns``)
SPLIT_REASON = ("one per assistant turn: the chat template renders earlier turns differently once the conversation "
                "goes on (as Qwen3's drops their reasoning), so one sequence cannot hold every turn as it was answered")


def _ignored_reason(key: str) -> str:
    return f"ignored key {key!r}"


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
        if not isinstance(turn, dict) or role_key not in turn:
            raise MalformedRecordError(source, f"turn {i} must be an object with {role_key!r} and {content_key!r}")
        if str(turn[role_key]).lower() == "function_call":  # ShareGPT with tools (LLaMA-Factory): a call as JSON text
            turn = {role_key: "assistant", "tool_calls": _function_calls(turn.get(content_key), i, source)}
        role = ROLE_ALIASES.get(str(turn[role_key]).lower())
        if role is None:
            raise MalformedRecordError(source, f"turn {i} has unknown role {turn[role_key]!r} "
                                               f"(known: {sorted(ROLE_ALIASES)})")
        message = {"role": role}
        # an empty list of calls is none (vLLM's server writes "tool_calls": [] on every message)
        message.update((k, turn[k]) for k in TURN_EXTRAS if turn.get(k) is not None and turn[k] != [])
        calls = message.get("tool_calls")
        if calls is not None and (role != "assistant" or not isinstance(calls, list)
                                  or not all(isinstance(c, dict) for c in calls)):
            raise MalformedRecordError(source, f"turn {i}'s 'tool_calls' must be a list of objects, on an assistant "
                                               f"turn (got {type(calls).__name__} on a {role} turn)")
        if calls is not None and not all(_call_name(c) for c in calls):
            raise MalformedRecordError(source, f"turn {i}'s tool calls must each name their function "
                                               "({\"function\": {\"name\": ..., \"arguments\": ...}})")
        content = turn.get(content_key)
        if content is None and calls is None:  # a tool call's turn may say nothing else
            raise MalformedRecordError(source, f"turn {i} must be an object with {role_key!r} and {content_key!r}")
        message["content"] = "" if content is None else _text(content, f"turn {i}'s {content_key!r}", source)
        messages.append(message)
    return _check_roles(messages, source, report)


def _call_name(item: dict) -> str | None:
    """The function name of an OpenAI-style tool call or tool schema (``{"function": {"name": ...}}`` or flat), or
    None where it has none that is a non-empty string."""
    inner = item.get("function") if isinstance(item.get("function"), dict) else item
    name = inner.get("name")
    return name if isinstance(name, str) and name else None


def _function_calls(value, i: int, source: str) -> list[dict]:
    """A ShareGPT ``function_call`` turn's value — the JSON text of ``{"name", "arguments"}`` or a list of them —
    as OpenAI-style ``tool_calls``."""
    try:
        calls = json.loads(value) if isinstance(value, str) else None
    except json.JSONDecodeError:
        calls = None
    calls = [calls] if isinstance(calls, dict) else calls
    if not calls or not isinstance(calls, list) or not all(isinstance(c, dict) and _call_name(c) for c in calls):
        raise MalformedRecordError(source, f"turn {i} ('function_call') must hold the JSON text of "
                                           '{"name": ..., "arguments": ...} or a list of them')
    return [{"type": "function", "function": c} for c in calls]


#: the role each role may be followed by, in a conversation after its system turns (an assistant turn with tool
#: calls: by their results, a result by another or by the assistant's next turn)
_NEXT = {"user": ("assistant",), "assistant": ("user",), "calls": ("tool",), "tool": ("tool", "assistant")}


def _check_roles(messages: list[dict], source: str, report: DataReport) -> list[dict]:
    """System turns first, then user and assistant alternating from a user turn — an assistant turn with
    ``tool_calls`` followed by one or more ``tool`` turns (the results) and then the assistant again; an
    unanswered last user turn, and results no assistant turn reads, are trimmed (and counted)."""
    i = 0
    while i < len(messages) and messages[i]["role"] == "system":
        i += 1
    expected = ("user",)
    for j in range(i, len(messages)):
        role = messages[j]["role"]
        if role not in expected:
            raise MalformedRecordError(source, f"turn {j} is {role!r} where {' or '.join(map(repr, expected))} was "
                                               "expected (after system turns, user and assistant must alternate, an "
                                               "assistant's tool calls answered by tool turns)")
        expected = _NEXT["calls" if "tool_calls" in messages[j] else role]
    while messages and messages[-1]["role"] == "tool":
        messages = messages[:-1]
        report.trim("unanswered last tool turn", source)
    if messages and messages[-1]["role"] == "user":
        messages = messages[:-1]
        report.trim("unanswered last user turn", source)
    if not any(m["role"] == "assistant" for m in messages):
        raise MalformedRecordError(source, "the conversation has no assistant turn to learn from")
    return messages


def _prompt_completion(prompt, completion, source: str, report: DataReport) -> Example:
    """TRL's prompt-completion record: the completion alone is trained (``last_turn_only``), as TRL's
    ``completion_only_loss`` trains it — assistant turns inside the prompt are context."""
    if isinstance(prompt, str) and isinstance(completion, str):
        return Example([{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}], source,
                       last_turn_only=True)
    if not (isinstance(prompt, list) and isinstance(completion, list)):
        raise MalformedRecordError(source, f"'prompt' and 'completion' must both be strings or both lists of "
                                           f"messages, got {type(prompt).__name__} and {type(completion).__name__}")
    if len(completion) != 1 or not isinstance(completion[0], dict) or completion[0].get("role") != "assistant":
        raise MalformedRecordError(source, "'completion' must be one assistant message "
                                           "([{\"role\": \"assistant\", \"content\": ...}])")
    messages = _turns(prompt + completion, source, "role", "content", report)
    return Example(messages, source, last_turn_only=True)


_GUANACO = re.compile(r"### (Human|Assistant):")


def _guanaco(text: str, source: str, report: DataReport) -> list[dict]:
    parts = _GUANACO.split(text)
    if len(parts) < 3 or parts[0].strip():
        raise MalformedRecordError(source, "'text' must be a '### Human: ... ### Assistant: ...' dialogue")
    messages = [{"role": "user" if who == "Human" else "assistant", "content": body.strip()}
                for who, body in zip(parts[1::2], parts[2::2], strict=True)]
    return _check_roles(messages, source, report)


#: the keys each format reads, in the order the formats are recognised; any other key of a record is ignored
#: (counted in the report: metadata such as ``id`` or ``source``), unless it plainly misspells a key that would have
#: been read (``inptu``), which is an error
FORMAT_KEYS = {"messages": ("messages", "tools"), "conversations": ("conversations", "tools"),
               "Alpaca": ("instruction", "input", "output"), "input/output": ("input", "output"),
               "prompt/completion": ("prompt", "completion", "tools"), "text": ("text",)}
#: ("tools" is optional: a near name, such as a "tool" of metadata, is ignored and counted, not taken for a typo)
_KNOWN_KEYS = sorted({k for keys in FORMAT_KEYS.values() for k in keys} - {"tools"})


#: the keys that make a record each format (with all of them it is that format, unless an earlier one)
_TRIGGERS = {"messages": ("messages",), "conversations": ("conversations",), "Alpaca": ("instruction",),
             "input/output": ("input", "output"), "prompt/completion": ("prompt", "completion"), "text": ("text",)}


def _readable_keys(fmt: str, record: dict) -> set[str]:
    """The keys that a record of format ``fmt`` reads, or that, with the record's other keys, would make it a format
    recognised before it (``prompt`` beside a ``completion``; not ``prompt`` alone)."""
    formats = list(FORMAT_KEYS)
    earlier = {k for f in formats[:formats.index(fmt)] for k in _TRIGGERS[f]
               if all(other in record for other in _TRIGGERS[f] if other != k)}
    return set(FORMAT_KEYS[fmt]) | earlier


@functools.lru_cache(maxsize=1024)
def _near_keys(key: str) -> tuple[str, ...]:
    """The known keys that ``key`` plainly misspells (any case; ``difflib``'s similarity of at least 0.8 and at most
    one letter more or less: a swapped pair, a letter wrong, missing or extra — not ``conversation_id``)."""
    near = [k for k in _KNOWN_KEYS if k != key and abs(len(k) - len(key)) <= 1]
    return tuple(difflib.get_close_matches(key.lower(), near, n=3, cutoff=0.8))


def _misspelt(record: dict, keys, readable=_KNOWN_KEYS) -> tuple[str, str] | None:
    """``(key, known key it misspells)`` for the first of ``keys`` that misspells a ``readable`` key the record
    lacks."""
    for key in keys:
        near = [k for k in _near_keys(key) if k in readable and k not in record]
        if near:
            return key, near[0]
    return None


def _unused_keys(record: dict, fmt: str, source: str) -> list[str]:
    """The record's keys that its format does not read; a misspelling among them is an error."""
    unused = sorted(set(record) - set(FORMAT_KEYS[fmt]))
    if (typo := _misspelt(record, unused, _readable_keys(fmt, record))) is not None:
        raise MalformedRecordError(
            source, f"unknown key {typo[0]!r}: did you mean {typo[1]!r}? (the {fmt} format reads "
                    f"{', '.join(map(repr, FORMAT_KEYS[fmt]))}; other keys are ignored and counted in the report)")
    return unused


def _tools(tools, source: str) -> list | None:
    """The record's ``tools``: a list of JSON schemas, or the JSON text of one (as some Hub data sets store it)."""
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as e:
            raise MalformedRecordError(source, f"'tools' is a string but not JSON ({e})") from None
    if tools is None or tools == []:
        return None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise MalformedRecordError(source, "'tools' must be a list of JSON schemas (objects), or the JSON text of "
                                           f"one, got {type(tools).__name__}")
    return tools


def record_to_example(record, source: str, report: DataReport | None = None) -> Example:
    """Normalize one parsed record (see the module docstring for the formats). Keys its format does not read are
    counted in the report as ignored (where a wrong name would otherwise lose a field without a word); one that
    misspells a key the format reads is an error."""
    report = report if report is not None else DataReport()
    if not isinstance(record, dict):
        raise MalformedRecordError(source, f"a record must be a JSON object, got {type(record).__name__}")
    if "messages" in record:
        fmt = "messages"
    elif "conversations" in record:
        fmt = "conversations"
    elif "instruction" in record:
        fmt = "Alpaca"
    elif "input" in record and "output" in record:
        fmt = "input/output"
    elif "prompt" in record and "completion" in record:
        fmt = "prompt/completion"
    elif "text" in record:
        fmt = "text"
    else:
        typo = _misspelt(record, sorted(record))
        hint = f" ({typo[0]!r}: did you mean {typo[1]!r}?)" if typo else ""
        raise MalformedRecordError(
            source, f"unrecognised record with keys {sorted(record)}{hint}; expected 'instruction'/'input'/'output' "
                    "(Alpaca), 'input'/'output', 'prompt'/'completion', 'messages', 'conversations', or a '### Human:' "
                    "'text'")
    unused = _unused_keys(record, fmt, source)
    if fmt == "messages":
        example = Example(_turns(record["messages"], source, "role", "content", report), source)
    elif fmt == "conversations":
        turns = record["conversations"]
        sharegpt = isinstance(turns, list) and turns and isinstance(turns[0], dict) and "from" in turns[0]
        keys = ("from", "value") if sharegpt else ("role", "content")
        example = Example(_turns(turns, source, *keys, report), source)
    elif fmt == "Alpaca":
        if "output" not in record:
            raise MalformedRecordError(source, "an Alpaca record needs 'output'")
        instruction = _text(record["instruction"], "'instruction'", source)
        extra = record.get("input")  # only a missing, null or empty input is no input: 0 or [] is an error
        extra = "" if extra is None else _text(extra, "'input'", source)
        output = _text(record["output"], "'output'", source)
        user = f"{instruction}\n\n{extra}" if extra else instruction
        example = Example([{"role": "user", "content": user}, {"role": "assistant", "content": output}], source,
                          alpaca=(instruction, extra))
    elif fmt == "input/output":
        example = Example([{"role": "user", "content": _text(record["input"], "'input'", source)},
                           {"role": "assistant", "content": _text(record["output"], "'output'", source)}], source)
    elif fmt == "prompt/completion":
        example = _prompt_completion(record["prompt"], record["completion"], source, report)
    else:
        example = Example(_guanaco(_text(record["text"], "'text'", source), source, report), source)
    if "tools" in FORMAT_KEYS[fmt]:
        example.tools = _tools(record.get("tools"), source)
    for key in unused:
        report.ignore(key, source)
    return example


# ------------------------------------------------------------------------------------------------ files
def _check_on_malformed(on_malformed: str) -> None:
    if on_malformed not in ("error", "drop"):
        raise ValueError(f"on_malformed must be 'error' or 'drop', got {on_malformed!r}")


def _byte_lines(f):
    """The lines of a binary file, split where text mode splits them (``\\n``, ``\\r\\n`` or ``\\r``), without
    their ends."""
    for chunk in f:
        yield from chunk.splitlines()


def _decode(raw: bytes, source: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise MalformedRecordError(source, f"not UTF-8 text (byte 0x{raw[e.start]:02x} at byte {e.start + 1} of the "
                                           "line): save the file as UTF-8") from None


def read_jsonl(path: str | os.PathLike, report: DataReport | None = None, on_malformed: str = "error"
               ) -> list[Example]:
    """Every record of a JSON-lines file as an :class:`Example` (blank lines are skipped). A malformed record
    raises :class:`MalformedRecordError` ("file:line: ..."), or with ``on_malformed="drop"`` is counted in the
    report under "malformed record" and skipped."""
    _check_on_malformed(on_malformed)
    report = report if report is not None else DataReport()
    path = Path(path)
    examples = []
    with open(path, "rb") as f:  # decoded line by line, so that a non-UTF-8 byte is an error naming its line
        for lineno, raw in enumerate(_byte_lines(f), start=1):
            if lineno == 1 and raw.startswith(codecs.BOM_UTF8):  # as Windows editors save "UTF-8"
                raw = raw[len(codecs.BOM_UTF8):]
            if not raw.decode("utf-8", "replace").strip():  # blank, Unicode spaces included (as text mode read it)
                continue
            source = f"{path}:{lineno}"
            report.records += 1
            try:
                line = _decode(raw, source)
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


def read_json(path: str | os.PathLike, report: DataReport | None = None, on_malformed: str = "error"
              ) -> list[Example]:
    """The records of a ``.json`` file, read as Hugging Face ``datasets``' json loader reads one: a JSON array of
    records (Alpaca's ``alpaca_data.json``), or else one record a line (:func:`read_jsonl`). A record is named by
    the line it starts on; a record of the wrong form is dropped with ``on_malformed="drop"``, but broken JSON
    syntax or a non-UTF-8 byte is always an error (an array cannot be read past it)."""
    _check_on_malformed(on_malformed)
    report = report if report is not None else DataReport()
    path = Path(path)
    raw = path.read_bytes()
    if raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8):]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise MalformedRecordError(f"{path}:{line}", f"not UTF-8 text (byte 0x{raw[e.start]:02x}): save the file "
                                                     "as UTF-8") from None
    if not text.lstrip().startswith("["):
        if "\n" in text.strip() and _is_json_object(text):  # read line by line, each line would be broken
            raise MalformedRecordError(f"{path}:1", "one JSON object spread over lines: expected an array of "
                                                    "records ([{...}, {...}]) or one record a line")
        return read_jsonl(path, report, on_malformed)
    examples = []
    decoder, end = json.JSONDecoder(), len(text)

    def skip_space(i: int) -> int:
        while i < end and text[i] in " \t\r\n":
            i += 1
        return i

    def syntax_error(i: int, what: str) -> MalformedRecordError:
        line = text.count("\n", 0, i) + 1
        return MalformedRecordError(f"{path}:{line}", f"invalid JSON array ({what} at column "
                                                      f"{i - text.rfind(chr(10), 0, i)})")

    i = skip_space(text.index("[") + 1)
    while i < end and text[i] != "]":
        source = f"{path}:{text.count(chr(10), 0, i) + 1}"
        try:
            record, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise syntax_error(e.pos, e.msg) from None
        report.records += 1
        _append(examples, record, source, report, on_malformed)
        i = skip_space(i)
        if i < end and text[i] == ",":
            i = skip_space(i + 1)
        elif i < end and text[i] != "]":
            raise syntax_error(i, "expected ',' or ']'")
    if i >= end:
        raise syntax_error(end, "the array is not closed by ']'")
    if skip_space(i + 1) < end:
        raise syntax_error(skip_space(i + 1), "extra data after the array")
    report.kept += len(examples)
    return examples


def _append(examples: list[Example], record, source: str, report: DataReport, on_malformed: str) -> None:
    """``record`` as an example onto ``examples``; a malformed one raises, or is counted and dropped."""
    try:
        examples.append(record_to_example(record, source, report))
    except MalformedRecordError as e:
        if on_malformed == "error":
            raise
        report.drop("malformed record", str(e))


def read_parquet(path: str | os.PathLike, report: DataReport | None = None, on_malformed: str = "error"
                 ) -> list[Example]:
    """The rows of a Parquet file as records — the form the Hugging Face Hub serves a data set in
    (``data/train-00000-of-00001.parquet``): its columns are the record's keys (nested lists of structs are
    ``messages``), a null is a missing value, at any depth. A row is named ``file:row N`` (from 1). Read with
    ``pyarrow`` (the ``demo`` extra), one row group at a time."""
    _check_on_malformed(on_malformed)
    report = report if report is not None else DataReport()
    path = Path(path)
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(f"{path}: reading Parquet needs the 'pyarrow' package: pip install 'qlora[demo]'") from e
    try:
        file = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise MalformedRecordError(str(path), f"not a readable Parquet file ({e})") from None
    examples: list[Example] = []
    row = 0
    batches = file.iter_batches()
    while True:
        try:  # a damaged page shows only when read
            batch = next(batches, None)
        except (pa.ArrowException, OSError) as e:
            raise MalformedRecordError(f"{path}:row {row + 1}", f"unreadable Parquet data ({e})") from None
        if batch is None:
            break
        for record in batch.to_pylist():
            row += 1
            report.records += 1
            record = _without_nulls(record)  # a column or struct field this row has no value in
            _append(examples, record, f"{path}:row {row}", report, on_malformed)
    report.kept += len(examples)
    return examples


def _without_nulls(value):
    """``value`` without the null entries of its objects, at any depth: Parquet gives every row every field of a
    struct column (a tool call's ``arguments`` gets ``null`` for the keys of other rows' calls), so a null there is
    a key the row does not have."""
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def _is_json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except json.JSONDecodeError:
        return False


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
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:  # named by its line, as a JSONL file's
        start = data.rfind(b"\n", 0, e.start) + 1
        lineno = data.count(b"\n", 0, start) + 1
        _decode(data[start:e.end], f"{name}:{lineno}")
        raise  # pragma: no cover - _decode raised
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

    The shipped corpus has two flaws we cannot fix upstream (chatterbot-corpus 1.3.3). ``english/trivia.yml`` line
    35: a missing "- " turns one question/answer pair into a single string, so by default malformed entries are
    dropped and counted in the report with their file and line (``on_malformed="error"`` raises instead). And
    entries repeat: ``english/tech_support.yml`` is 10 conversations written 105 times over, ``coding.yml`` holds
    some three times; a copy would put the same pair on both sides of the held-out split (a "held-out" loss on
    examples the model trained on), so every copy after the first is dropped and counted, naming both places."""
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
    examples, first = [], {}
    for f in files:
        for ex in read_chatterbot_yaml(f, report, on_malformed, display_name=f"chatterbot_corpus/{language}/{f.name}"):
            key = tuple((m["role"], m["content"]) for m in ex.messages)
            if key in first:  # a copy would land on both sides of the held-out split
                report.kept -= 1
                report.drop("a copy of an earlier entry", f"{ex.source} = {first[key]}")
            else:
                first[key] = ex.source
                examples.append(ex)
    return examples


DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".yml", ".yaml")


def is_corpus_spec(spec) -> bool:
    """Whether ``spec`` names the shipped chatterbot corpus (``chatterbot[:language[:categories]]``). A file or
    folder of the same name is refused rather than shadowed (or read where the README's commands mean the corpus):
    the message says how to name either."""
    s = str(spec)
    if not (s == "chatterbot" or s.startswith("chatterbot:")):
        return False
    if Path(s).exists():
        kind = "folder" if Path(s).is_dir() else "file"
        corpus = "chatterbot:english for the corpus" if s == "chatterbot" else "rename the local one to read the corpus"
        raise ValueError(f"{s!r} names both a local {kind} and the shipped chatterbot corpus: write ./{s} for the "
                         f"{kind}, or {corpus}")
    return True


#: a shard of a Hugging Face data set's split: ``train-00000-of-00003.parquet`` (older ``datasets`` releases add a
#: hash: ``train-00000-of-00001-a09b74b3ef9c3b56.parquet``)
_SHARD = re.compile(r"^(?P<name>.+?)-\d{5}-of-\d{5}(?:-[0-9a-f]{8,})?\.[^.]+$", re.IGNORECASE)
#: a file name that begins with a split's name (``test.jsonl``, ``test_sft-…``, ``validation-…``), and the split
_SPLIT = re.compile(r"^(train|training|test|testing|eval|evaluation|validation|valid|val|dev)(?:[-._ 0-9]|$)",
                    re.IGNORECASE)
_SPLIT_OF = {"training": "train", "testing": "test", "eval": "test", "evaluation": "test", "valid": "validation",
             "val": "validation", "dev": "validation"}
#: the splits a fine-tune must not train on
HELD_OUT_SPLITS = ("test", "validation")


def _split_of(file: Path) -> str | None:
    """The split a data file holds by its name (``train-00000-of-00002.parquet``, ``test.jsonl``, ``dev_v2.json``:
    train, test, validation), or None."""
    m = _SHARD.match(file.name)
    k = _SPLIT.match(m["name"] if m else file.stem)
    return None if k is None else _SPLIT_OF.get(k[1].lower(), k[1].lower())


def is_glob(spec: str) -> bool:
    """Whether a data spec is a file pattern (``data/train-*.parquet``) rather than one path."""
    return any(c in spec for c in "*?[")


def matching_files(pattern: str) -> list[Path]:
    """The data files a pattern names (``**`` crosses folders), sorted; a pattern that names none, names only
    folders, or names a file that is not data, is an error naming it; so is one that mixes a held-out split with
    other files (:func:`check_one_split`)."""
    import glob

    matches = [Path(p) for p in glob.glob(pattern, recursive=True)]
    files = sorted(p for p in matches if p.is_file())
    if not files:
        folders = f" (only folders: {[str(p) for p in matches[:3]]}; name a folder itself)" if matches else ""
        raise ValueError(f"{pattern}: no file matches the pattern{folders}")
    other = [str(f) for f in files if f.suffix.lower() not in DATA_SUFFIXES]
    if other:
        raise ValueError(f"{pattern}: matches files that are not .jsonl/.json/.parquet/.yml/.yaml: {other[:3]}")
    check_one_split(pattern, files)
    return files


def check_one_split(where, files: list[Path]) -> None:
    """Data files read as one training set must not hold a held-out split beside other data (``train.jsonl`` and
    ``test.jsonl``, a Hub data set's ``train-…`` and ``validation-…`` shards): read whole, the held-out split would
    be trained on. Files of one split only (all test files, for ``--eval-data``) pass, as do names that say no
    split."""
    split = {f: _split_of(f) for f in files}
    held = [f for f in files if split[f] in HELD_OUT_SPLITS]
    if not held or (len(held) == len(files) and len({split[f] for f in held}) == 1):
        return
    keep = next((f for f in files if split[f] == "train"), next((f for f in files if f not in held), held[0]))
    m = _SHARD.match(keep.name)
    hint = keep.parent / (f"{m['name']}-*{keep.suffix}" if m else keep.name)
    splits = sorted({s or "unnamed" for s in split.values()})
    raise ValueError(f"{where}: holds several splits of a data set ({', '.join(splits)}; held out: "
                     f"{', '.join(f.name for f in held[:3])}), which would all be read as training data; name one, "
                     f"e.g. --data '{hint}' (and the held-out one as --eval-data)")


def load_examples(spec: str | os.PathLike, report: DataReport | None = None, on_malformed: str | None = None
                  ) -> list[Example]:
    """Examples from ``spec``: a ``.jsonl`` file, a ``.json`` file (an array of records, or one a line), a
    ``.parquet`` file (a Hugging Face Hub data set's), a chatterbot-style ``.yml``/``.yaml`` file, a folder of
    those (any case of the suffix; its other files and sub-folders are skipped and counted in the report; a
    held-out split beside other data is refused: :func:`check_one_split`), a file pattern
    (``data/train-*.parquet``, in sorted order), or ``"chatterbot"`` / ``"chatterbot:<language>"`` /
    ``"chatterbot:<language>:<cat1>,<cat2>"`` (see :func:`is_corpus_spec`). ``on_malformed``: ``"error"`` or
    ``"drop"`` (counted in the report); None: each source's own default (a user's file is an error, the shipped
    corpus's few irregular entries are dropped)."""
    report = report if report is not None else DataReport()
    if on_malformed is not None:
        _check_on_malformed(on_malformed)
    s = str(spec)
    if is_corpus_spec(s):
        parts = s.split(":")
        language = parts[1] if len(parts) > 1 and parts[1] else "english"
        categories = parts[2].split(",") if len(parts) > 2 and parts[2] else None
        return load_chatterbot_corpus(language, categories, report, on_malformed or "drop")
    path = Path(spec)
    if not path.exists() and is_glob(s):
        files = matching_files(s)
        return [ex for f in files for ex in load_examples(f, report, on_malformed)]
    if path.is_dir():
        files = []
        for p in sorted(path.iterdir()):
            if p.is_file() and p.suffix.lower() in DATA_SUFFIXES:
                files.append(p)
            else:
                report.skip("a sub-folder, not read" if p.is_dir() else "not a .jsonl/.json/.parquet/.yml/.yaml file",
                            str(p))
        check_one_split(path, files)
        return [ex for f in files for ex in load_examples(f, report, on_malformed)]
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return read_jsonl(path, report, on_malformed or "error")
    if suffix == ".json":
        return read_json(path, report, on_malformed or "error")
    if suffix == ".parquet":
        return read_parquet(path, report, on_malformed or "error")
    if suffix in (".yml", ".yaml"):
        return read_chatterbot_yaml(path, report, on_malformed or "error")
    raise ValueError(f"cannot read {s!r}: expected a .jsonl, .json, .parquet, .yml or .yaml file, a folder, a file "
                     "pattern, or 'chatterbot[:language]'")
