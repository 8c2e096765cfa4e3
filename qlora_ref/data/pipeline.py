"""From examples to training batches: prompt formatting, tokenization with response-only labels, length
filtering, length-grouped batching, padding.

Formatting. With a chat template (the model's, e.g. SmolLM2-Instruct's ChatML) each assistant turn's boundary
is found by rendering the conversation up to it twice — with ``add_generation_prompt=True`` (the prompt) and
with the turn (prompt + response) — so the text between is the response, end-of-turn marker included. Each
response must extend its own prompt (a template where it does not is refused). A conversation is one sequence
when the template is prefix-consistent over it (each rendering extends the previous one), which ChatML,
Llama-2/3 and most templates are; a template that re-renders earlier turns as the conversation grows (Qwen3's
shows an assistant turn's reasoning block only after the last user message) gets one sequence per assistant turn
instead (:func:`split_turns`), the turns before it rendered as the model sees them when it answers it.

Without a template the Alpaca format of the paper's scripts is used (``qlora.py``'s ``ALPACA_PROMPT_DICT``): BOS +
"Below is an instruction ... ### Response: " as the prompt, the output + EOS as the response.

Tokenization. With a chat template the rendered conversation is tokenized once, as transformers and llama.cpp
tokenize it, and cut at the segments' ends; without one, segments are tokenized apart, as the paper's scripts
tokenize source and target.

Labels. ``labels`` is a copy of ``input_ids`` with ``-100`` on prompt tokens (the paper trains on responses
only; ``train_on_source=True`` is its ablation, loss on everything) and on padding, Hugging Face's convention,
consumed by ``qlora_ref.loss`` and by transformers alike.

Lengths. An example longer than ``max_length`` tokens is dropped whole (a cut response would teach the model to
stop mid-sentence), and so is one with no response token; both are counted in the :class:`DataReport` and
announced with a warning.

Batches. ``{"input_ids", "attention_mask", "labels"}``, int64 ``[B, T]`` NumPy arrays, right-padded to the
longest example of the batch. With ``group_by_length`` the order is transformers' ``LengthGroupedSampler``'s:
a random permutation cut into mega-batches of 50 batches, each sorted by length, the longest batch first (a
long batch early shows an out-of-memory at once — or, with a paged optimizer, the page-outs).

Packing. Short examples padded to a batch's longest waste compute on padding and on per-step overhead; packed,
several examples share one row of up to ``max_length`` tokens (:func:`pack_examples`: first-fit decreasing) and
the batch gains ``position_ids``, restarting at 0 with every example. The positions are the whole description of
the packing: a new example begins wherever a position does not follow its predecessor by one (transformers' rule,
``masking_utils.find_packed_sequence_indices``), and the models keep attention inside each example (block-diagonal
causal) from them. The first token of every example gets label -100, so the last token of one example never
learns to predict the first of the next: a packed batch has exactly the targets of the same examples unpadded,
and the loss, summed over them and divided by their number, is the same.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
import weakref
from bisect import bisect_right
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import accumulate

import numpy as np

from ..loss import IGNORE_INDEX
from .formats import DataReport, Example
from .tokenizer import ChatTemplateError, encode, has_chat_template

#: the prompts of the paper's scripts (qlora.py, ALPACA_PROMPT_DICT)
ALPACA_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response: "
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response: "
)
#: later turns of a conversation in the fallback format
ALPACA_NEXT_TURN = "\n\n### Instruction:\n{instruction}\n\n### Response: "


# ------------------------------------------------------------------------------------------------ formatting
class TemplateRewritesHistory(ChatTemplateError):
    """The chat template renders an earlier turn differently once the conversation goes on, so no one sequence holds
    every turn as the model saw it when answering (handled by :func:`split_turns`)."""


def _render(tokenizer, example: Example, messages: list[dict], generation: bool, tools: bool = True) -> str:
    """The chat template's rendering of ``messages`` (the example's, or some of them) with the example's tools
    (``tools=False``: without; passed only where there are some: a tokenizer of the interface need not take them).
    A template's failure names the example."""
    kwargs = {"tools": example.tools} if tools and example.tools is not None else {}
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation, **kwargs)
    except ChatTemplateError as e:
        raise ChatTemplateError(f"{example.source}: {e}") from None
    except Exception as e:  # noqa: BLE001 - a tokenizer's own renderer (transformers': jinja2's errors)
        raise ChatTemplateError(f"{example.source}: the chat template failed: {type(e).__name__}: {e}") from None


def _turn(tokenizer, example: Example, i: int) -> tuple[str, str]:
    """(prompt, prompt + response) of assistant turn ``i``: the conversation before it with the generation prompt,
    and up to it. The response must extend its prompt, or it cannot be located at all. A turn's tool calls must
    change what the template renders — a template without tool calling drops them, and the turn would teach the
    model to answer with nothing."""
    msgs = example.messages
    prompt, full = _render(tokenizer, example, msgs[:i], True), _render(tokenizer, example, msgs[: i + 1], False)
    if not full.startswith(prompt):
        raise ChatTemplateError(f"{example.source}: the chat template is not prefix-consistent (turn {i} does not "
                                "extend the generation prompt before it), so the response cannot be located")
    if "tool_calls" in msgs[i]:
        without = [*msgs[:i], {k: v for k, v in msgs[i].items() if k != "tool_calls"}]
        if _render(tokenizer, example, without, False) == full:
            raise ChatTemplateError(f"{example.source}: the chat template renders turn {i} the same without its tool "
                                    "calls: it has no tool calling (this model's template drops them)")
    return prompt, full


def _check_tools(tokenizer, example: Example) -> None:
    """The record's tools must change the prompt of its first answer: a template that ignores them would teach
    calls of functions the prompt never showed."""
    i = next((i for i, m in enumerate(example.messages) if m["role"] == "assistant"), len(example.messages))
    before = example.messages[:i]
    if _render(tokenizer, example, before, True) == _render(tokenizer, example, before, True, tools=False):
        raise ChatTemplateError(f"{example.source}: the chat template renders the prompt of turn {i} the same "
                                "without the record's 'tools': it ignores them (this model's template has no tool "
                                "calling)")


def _template_segments(example: Example, tokenizer) -> list[tuple[str, bool]]:
    msgs = example.messages
    if example.tools is not None:
        _check_tools(tokenizer, example)
    if example.last_turn_only:  # the turns before the last are the prompt, as a whole
        if msgs[-1]["role"] != "assistant":
            return [(_render(tokenizer, example, msgs, True), False)]
        prompt, full = _turn(tokenizer, example, len(msgs) - 1)
        return [(prompt, False), (full[len(prompt):], True)]
    segments: list[tuple[str, bool]] = []
    done = ""
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        prompt, full = _turn(tokenizer, example, i)
        if not prompt.startswith(done):
            raise TemplateRewritesHistory(f"{example.source}: the chat template renders the turns before turn {i} "
                                          "differently from the rendering that ended at them")
        segments.append((prompt[len(done):], False))
        segments.append((full[len(prompt):], True))
        done = full
    if msgs and msgs[-1]["role"] != "assistant":  # a prompt for generation: up to where the answer begins
        prompt = _render(tokenizer, example, msgs, True)
        if not prompt.startswith(done):
            raise TemplateRewritesHistory(f"{example.source}: the chat template renders the conversation differently "
                                          "once the generation prompt follows it")
        segments.append((prompt[len(done):], False))
    return segments


def split_turns(example: Example) -> list[Example]:
    """One example per assistant turn of ``example``: the conversation up to that turn, trained on that turn alone
    (``last_turn_only``), the turns before it rendered as the chat template renders them when the model answers it
    — what the model sees at inference. For templates that re-render history (:class:`TemplateRewritesHistory`);
    the cost is a prompt that grows with every turn."""
    ends = [i for i, m in enumerate(example.messages) if m["role"] == "assistant"]
    return [Example(example.messages[: i + 1], f"{example.source} (turn {k})", example.alpaca, last_turn_only=True,
                    tools=example.tools)
            for k, i in enumerate(ends, 1)]


def _alpaca_segments(example: Example) -> list[tuple[str, bool]]:
    if example.tools is not None or any(m["role"] == "tool" or "tool_calls" in m for m in example.messages):
        raise ChatTemplateError(f"{example.source}: tool calls need the model's chat template, and this tokenizer "
                                "has none (the Alpaca prompt of the fallback has no place for tools)")
    segments: list[tuple[str, bool]] = []
    msgs = list(example.messages)
    system = ""
    while msgs and msgs[0]["role"] == "system":
        system += msgs.pop(0)["content"] + "\n\n"
    first = True
    for m in msgs:
        if m["role"] == "user":
            if first and example.alpaca is not None and not system:
                instruction, extra = example.alpaca
                template = ALPACA_PROMPT_INPUT if extra else ALPACA_PROMPT_NO_INPUT
                text = template.format(instruction=instruction, input=extra)
            elif first:
                text = ALPACA_PROMPT_NO_INPUT.format(instruction=m["content"])
                if system:
                    text = system + text.split("\n\n", 1)[1]  # the system prompt replaces the preamble
            else:
                text = ALPACA_NEXT_TURN.format(instruction=m["content"])
            segments.append((text, False))
            first = False
        else:
            segments.append((m["content"], True))
    return segments


def _answer_segments(example: Example, tokenizer) -> list[tuple[str, bool]]:
    """The example as text segments ``(text, is_answer)``, every assistant answer marked."""
    if has_chat_template(tokenizer):
        return _template_segments(example, tokenizer)
    return _alpaca_segments(example)


def _trained(example: Example, segments: list[tuple]) -> list[tuple]:
    """``segments`` with only the last answer marked as a response where the example trains its last turn only
    (``last_turn_only``: the answers before are context)."""
    if not example.last_turn_only:
        return segments
    last = max((i for i, (_, is_answer) in enumerate(segments) if is_answer), default=None)
    return [(part, i == last) for i, (part, _) in enumerate(segments)]


def format_example(example: Example, tokenizer) -> list[tuple[str, bool]]:
    """The example as text segments ``(text, is_response)``, in order (without BOS/EOS tokens)."""
    return _trained(example, _answer_segments(example, tokenizer))


def _whole_text_segments(tokenizer, texts: list[tuple[str, bool]]) -> list[tuple[list[int], bool]]:
    """The rendered conversation tokenized once, as transformers, TRL and llama.cpp tokenize it, and cut where each
    segment's text ends: at the tokens that the text up to there and the whole text share (a token that spans a
    boundary goes to the later segment; :func:`_tokens_shared`). Tokenizing segments apart would differ where a
    tokenizer treats the start of a text specially: SentencePiece's "▁" before every text would open each answer
    with a token of its own."""
    return _cut(tokenizer, texts, _checked_offset_encoder(tokenizer))


def _cut(tokenizer, texts: list[tuple[str, bool]], fast) -> list[tuple[list[int], bool]]:
    """:func:`_whole_text_segments` with ``fast``, an :func:`_offset_encoder` (None: every prefix re-encoded)."""
    if not texts:
        return []
    whole, shared = _tokens_shared(tokenizer, "".join(part for part, _ in texts), fast)
    cuts = [0]
    for end in accumulate(len(part) for part, _ in texts[:-1]):
        cuts.append(max(shared(end), cuts[-1]))
    cuts.append(len(whole))
    return [(whole[a:b], is_answer) for a, b, (_, is_answer) in zip(cuts[:-1], cuts[1:], texts, strict=True)]


def _tokens_shared(tokenizer, text: str, fast):
    """``(ids, shared)``: the token ids of ``text``, and ``shared(c)``: how many of them lead the ids of
    ``text[:c]`` too.

    Found by tokenizing ``text[:c]`` — quadratic in the number of turns over a conversation — except with ``fast``,
    for a ``tokenizers`` tokenizer (:func:`_offset_encoder`), which cuts a text at its added tokens
    (``<|im_start|>``, ``</s>``) before anything else and tokenizes each stretch between them on its own; the whole
    text's offsets show where its added tokens are (those not normalized, whose offsets span their text). Where
    ``c`` starts or ends an added token of the whole text, ``text[:c]`` is tokenized as the whole is up to there;
    elsewhere, as the whole up to the last added token before ``c``, followed by that token and the rest up to ``c``
    (encoded here together, so that the stretch is not taken for the text's first: a few characters after a chat
    template's role marker). Counting the tokens that end by ``c``
    would not do: a stretch cut short can tokenize differently before the cut too ("x  y" is "x", " ", " y" by
    GPT-2's split rule, "x  " is "x", "  "; a BPE without word splits may merge across the cut first)."""
    if fast is None:
        whole = encode(tokenizer, text)
        return whole, lambda c: _shared(encode(tokenizer, text[:c]), whole)
    with_offsets, added = fast
    whole, offsets = with_offsets(text)
    # character position -> how many tokens of the whole precede it: at either end of an added token (edges), and
    # where a stretch starts (starts: the text's start, an added token's end; opened: where that added token began)
    edges, starts, opened = {0: 0}, {0: 0}, {}
    for i, (t, (a, b)) in enumerate(zip(whole, offsets, strict=True)):
        if t in added and text[a:b] == added[t]:  # an added token matched in the text
            edges[a] = i
            edges[b] = starts[b] = i + 1
            opened[b] = a
    positions = sorted(starts)

    def shared(c: int) -> int:
        if c in edges:
            return edges[c]
        s = positions[bisect_right(positions, c) - 1]
        # from the added token before the stretch: a stretch that does not open the text is tokenized as such
        # (Metaspace's prepend_scheme="first" puts "▁" before the text's first stretch only)
        a = opened.get(s, s)
        k = starts[s] - (a != s)
        return k + _shared(encode(tokenizer, text[a:c]), whole[k:])

    return whole, shared


#: the methods a transformers tokenizer encodes text through (v4 and v5)
_HF_ENCODE = ("encode", "__call__", "encode_plus", "_call_one", "_encode_plus", "_batch_encode_plus")


def _offset_encoder(tokenizer):
    """``(text -> (ids, character offsets), {id: text} of the added tokens matched in the raw text)`` for a tokenizer
    whose ``encode`` is a ``tokenizers.Tokenizer``'s — this project's :class:`~qlora_ref.model.tokenizer.Tokenizer`
    or a plain transformers fast tokenizer — and whose added tokens match as plain strings (no lstrip, rstrip or
    single-word rule, special tokens not read as text, no truncation or padding); None for any other."""
    from ..model.tokenizer import Tokenizer

    transformers = sys.modules.get("transformers")
    if type(tokenizer).encode is Tokenizer.encode:
        backend = tokenizer.backend
        plain = not (getattr(backend, "encode_special_tokens", False) or backend.truncation or backend.padding)

        def with_offsets(text):
            enc = backend.encode(text, add_special_tokens=False)
            return enc.ids, enc.offsets
    elif transformers is not None and isinstance(tokenizer, transformers.PreTrainedTokenizerFast):
        backend = tokenizer.backend_tokenizer
        base = transformers.PreTrainedTokenizerFast
        # a class with its own encoding is not plain: e.g. CodeLlama's, which cuts at its fill token
        plain = not getattr(tokenizer, "split_special_tokens", False) and all(
            getattr(type(tokenizer), f, None) is getattr(base, f, None) for f in _HF_ENCODE)

        def with_offsets(text):
            enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            return enc["input_ids"], enc["offset_mapping"]
    else:
        return None
    try:
        added = backend.get_added_tokens_decoder()
        if not plain or any(t.lstrip or t.rstrip or t.single_word for t in added.values()):
            return None
        return with_offsets, {i: t.content for i, t in added.items() if not t.normalized}
    except AttributeError:  # a tokenizers release without these: the slow path
        return None


#: whether each tokenizer's offset encoder passed its check (the encoder itself is not kept: it holds the tokenizer)
_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _checked_offset_encoder(tokenizer):
    """:func:`_offset_encoder`, once per tokenizer checked to cut as re-encoding every prefix does on a text of its
    own added tokens, whitespace runs and words cut everywhere — where the assumption about how ``tokenizers``
    splits at added tokens no longer held (another release, another tokenizer), a warning and the slow path."""
    fast = _offset_encoder(tokenizer)
    try:
        return fast if _CHECKED[tokenizer] else None
    except (KeyError, TypeError):  # TypeError: an object without weak references, checked each time
        pass
    if fast is not None:
        marks = sorted(set(fast[1].values()))[:4] or [""]
        text = "".join(f"{m}user\nHello  world{m} x  \n\n{i}é 🙂{m}" for i, m in enumerate(marks))
        for c in range(len(text) + 1):
            parts = [(text[:c], False), (text[c:], True)]
            if _cut(tokenizer, parts, None) != _cut(tokenizer, parts, fast):
                warnings.warn(f"{type(tokenizer).__name__}: cutting a conversation at its segments by the tokens' "
                              "offsets disagrees with re-encoding each prefix here; the slower way is used",
                              stacklevel=2)
                fast = None
                break
    with contextlib.suppress(TypeError):
        _CHECKED[tokenizer] = fast is not None
    return fast


def _shared(ids: list[int], whole: list[int]) -> int:
    """How many leading tokens ``ids`` shares with ``whole``."""
    return next((i for i, (a, b) in enumerate(zip(ids, whole, strict=False)) if a != b), min(len(ids), len(whole)))


def token_segments(example: Example, tokenizer) -> list[tuple[list[int], bool]]:
    """``format_example``'s segments as token ids ``(ids, is_response)``. With a chat template the rendered text is
    tokenized whole and cut at the segments' ends (:func:`_whole_text_segments`). Without one, segments are
    tokenized separately, as the paper's scripts tokenize source and target separately; BOS starts the sequence (a
    prompt segment of its own) and EOS ends every answer, trained or context (if the tokenizer has them)."""
    if has_chat_template(tokenizer):
        return _trained(example, _whole_text_segments(tokenizer, _answer_segments(example, tokenizer)))
    bos = getattr(tokenizer, "bos_token_id", None)
    eos = getattr(tokenizer, "eos_token_id", None)
    segments = [([int(bos)], False)] if bos is not None else []
    for text, is_answer in _answer_segments(example, tokenizer):
        seg = encode(tokenizer, text)
        if is_answer and eos is not None:
            seg = seg + [int(eos)]
        segments.append((seg, is_answer))
    return _trained(example, segments)


def tokenize_example(example: Example, tokenizer, train_on_source: bool = False) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of one example (``token_segments`` concatenated); labels are -100 on the prompt
    unless ``train_on_source``."""
    ids: list[int] = []
    labels: list[int] = []
    for seg, is_response in token_segments(example, tokenizer):
        ids.extend(seg)
        labels.extend(seg if (is_response or train_on_source) else [IGNORE_INDEX] * len(seg))
    return ids, labels


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a conversation that ends with a user turn, up to where the assistant's answer begins: the
    prompt for generation, formatted exactly as training formats the prompts of its examples (the chat template's
    generation prompt, or BOS + the Alpaca prompt of the paper's scripts without a template)."""
    if not messages or messages[-1].get("role") == "assistant":
        raise ValueError("messages must end with a user (or system) turn: the prompt for the assistant's answer")
    try:
        segments = token_segments(Example(list(messages), "prompt"), tokenizer)
    except TemplateRewritesHistory:  # as a turn of a split conversation is prompted (split_turns)
        segments = token_segments(Example(list(messages), "prompt", last_turn_only=True), tokenizer)
    return [t for seg, _ in segments for t in seg]


# ------------------------------------------------------------------------------------------------ dataset
@dataclass
class TokenizedDataset:
    """Tokenized examples that passed the length filter, with the report of what did not."""

    input_ids: list[np.ndarray]
    labels: list[np.ndarray]
    sources: list[str]
    max_length: int
    pad_token_id: int
    report: DataReport = field(default_factory=DataReport)

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def lengths(self) -> np.ndarray:
        return np.array([len(x) for x in self.input_ids], dtype=np.int64)


def pad_token_id_of(tokenizer) -> int:
    """The tokenizer's pad id, else its EOS id (as the paper's scripts do for LLaMA), else 0. Padding is masked
    out of attention and loss, so its value does not matter beyond being a valid id."""
    for attr in ("pad_token_id", "eos_token_id"):
        v = getattr(tokenizer, attr, None)
        if v is not None:
            return int(v)
    return 0


def no_stop_token(tokenizer) -> str | None:
    """Why a model trained with ``tokenizer`` would not learn to stop, or None: without a chat template the
    responses end with EOS, and a tokenizer without one (e.g. a folder whose special tokens are missing) leaves
    them open-ended, which nothing else would show."""
    if has_chat_template(tokenizer) or getattr(tokenizer, "eos_token_id", None) is not None:
        return None
    return ("the tokenizer has no chat template and no EOS token, so responses get no end-of-sequence token and the "
            "model will not learn to stop (name an eos_token in the model's tokenizer_config.json or "
            "special_tokens_map.json)")


#: the report's reason for an example dropped with ``skip_unrenderable``
UNRENDERABLE = "not renderable by the chat template (tool calls it has no place for, or its own error)"


def build_dataset(examples: list[Example], tokenizer, max_length: int, train_on_source: bool = False,
                  report: DataReport | None = None, warn: bool = True, skip_unrenderable: bool = False
                  ) -> TokenizedDataset:
    """Tokenize ``examples``; drop (and count) those longer than ``max_length`` tokens or without a response
    token, and with ``skip_unrenderable`` (``--skip-malformed``) those the chat template cannot render (a
    ``ChatTemplateError``: an error otherwise). ``report`` (e.g. the one the loader filled) is extended; with
    ``warn``, a warning summarises anything left out or split (:func:`split_turns`), and another says when
    responses get no EOS (:func:`no_stop_token`)."""
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    if warn and examples and (why := no_stop_token(tokenizer)) is not None:
        warnings.warn(why, stacklevel=2)
    report = report if report is not None else DataReport(records=len(examples), kept=len(examples))
    ids_out, labels_out, sources = [], [], []
    for example in examples:  # one at a time: token lists are Python ints, 36 bytes each
        try:
            try:
                parts = [(example, tokenize_example(example, tokenizer, train_on_source))]
            except TemplateRewritesHistory:
                turns = split_turns(example)
                parts = [(turn, tokenize_example(turn, tokenizer, train_on_source)) for turn in turns]
                report.split_into(len(turns), example.source)
        except ChatTemplateError:
            if not skip_unrenderable:
                raise
            report.drop(UNRENDERABLE, example.source)
            continue
        for ex, (ids, labels) in parts:
            if len(ids) > max_length:
                report.drop(f"longer than max_length={max_length} tokens", ex.source)
                continue
            # labels[0] is never a target (nothing predicts the first token)
            if all(lab == IGNORE_INDEX for lab in labels[1:]):
                report.drop("no response token", ex.source)
                continue
            ids_out.append(np.asarray(ids, dtype=np.int64))
            labels_out.append(np.asarray(labels, dtype=np.int64))
            sources.append(ex.source)
    report.kept = report.kept - (len(examples) - len(ids_out))  # a split conversation counts as its turns
    if warn and report.noteworthy:
        warnings.warn(f"data: {report.summary()}", stacklevel=2)
    return TokenizedDataset(ids_out, labels_out, sources, max_length, pad_token_id_of(tokenizer), report)


# ------------------------------------------------------------------------------------------------ batching
def length_grouped_order(lengths, batch_size: int, rng: np.random.Generator, mega_batch_mult: int | None = None
                         ) -> list[int]:
    """transformers' ``get_length_grouped_indices``: shuffle, cut into mega-batches of ``mega_batch_mult``
    batches (``min(n // (4 * batch_size), 50)``, at least 1), sort each by decreasing length, and move the
    longest example to the front so the first batch is the longest."""
    lengths = np.asarray(lengths)
    n = len(lengths)
    if mega_batch_mult is None:
        mega_batch_mult = max(min(n // (batch_size * 4), 50), 1)
    perm = rng.permutation(n)
    size = mega_batch_mult * batch_size
    megas = [sorted(perm[i:i + size].tolist(), key=lambda j: -lengths[j]) for i in range(0, n, size)]
    if megas:
        k = int(np.argmax([lengths[m[0]] for m in megas]))
        megas[0][0], megas[k][0] = megas[k][0], megas[0][0]
    return [j for m in megas for j in m]


def collate(input_ids: list[np.ndarray], labels: list[np.ndarray], pad_token_id: int,
            pad_to_multiple_of: int | None = None) -> dict[str, np.ndarray]:
    """Right-pad to the longest sequence (rounded up to ``pad_to_multiple_of``): int64 ``input_ids`` (pad id),
    ``attention_mask`` (1 real, 0 pad) and ``labels`` (-100 on padding)."""
    t = max(len(x) for x in input_ids)
    if pad_to_multiple_of:
        t = -(-t // pad_to_multiple_of) * pad_to_multiple_of
    b = len(input_ids)
    ids = np.full((b, t), pad_token_id, dtype=np.int64)
    mask = np.zeros((b, t), dtype=np.int64)
    labs = np.full((b, t), IGNORE_INDEX, dtype=np.int64)
    for i, (x, y) in enumerate(zip(input_ids, labels, strict=True)):
        ids[i, : len(x)] = x
        mask[i, : len(x)] = 1
        labs[i, : len(y)] = y
    return {"input_ids": ids, "attention_mask": mask, "labels": labs}


def batch_indices(dataset: TokenizedDataset, batch_size: int, shuffle: bool = True, group_by_length: bool = True,
                  seed: int = 0, epoch: int = 0, drop_last: bool = False) -> list[list[int]]:
    """The example indices of each batch of one epoch (deterministic in ``seed`` and ``epoch``)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = len(dataset)
    rng = np.random.default_rng([seed, epoch])
    if group_by_length:
        order = length_grouped_order(dataset.lengths, batch_size, rng)
    elif shuffle:
        order = rng.permutation(n).tolist()
    else:
        order = list(range(n))
    batches = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches.pop()
    return batches


def iterate_batches(dataset: TokenizedDataset, batch_size: int, shuffle: bool = True, group_by_length: bool = True,
                    seed: int = 0, epoch: int = 0, drop_last: bool = False,
                    pad_to_multiple_of: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Padded batches for one epoch (see :func:`batch_indices` and :func:`collate`)."""
    for idx in batch_indices(dataset, batch_size, shuffle, group_by_length, seed, epoch, drop_last):
        yield batch_of(dataset, idx, pad_to_multiple_of)


# ------------------------------------------------------------------------------------------------ packing
def pack_examples(lengths, max_length: int) -> list[list[int]]:
    """Indices of the examples in each pack: first-fit decreasing (Johnson 1973) — the examples by decreasing
    length (ties by index), each into the first pack it still fits in (at most ``max_length`` tokens), else into a
    new pack. At most 11/9 of the optimal number of packs plus one; deterministic."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    if lengths.size and lengths.max() > max_length:
        raise ValueError(f"an example of {lengths.max()} tokens does not fit a pack of max_length={max_length}")
    packs: list[list[int]] = []
    room = np.zeros(0, dtype=np.int64)  # free tokens of each pack
    for i in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):
        fits = np.flatnonzero(room >= lengths[i])
        if fits.size:
            packs[fits[0]].append(i)
            room[fits[0]] -= lengths[i]
        else:
            packs.append([i])
            room = np.append(room, max_length - lengths[i])
    return packs


def packed_batch_indices(dataset: TokenizedDataset, batch_size: int, shuffle: bool = True, seed: int = 0,
                         epoch: int = 0, pack_length: int | None = None) -> list[list[list[int]]]:
    """The packs of each batch of one epoch: ``batch_size`` packs per batch, each pack a list of example indices
    of at most ``pack_length`` tokens (default: the data set's ``max_length``; a longer row wastes less of its
    end, since the examples' lengths rarely add up to exactly one row). The packs are the same every epoch
    (:func:`pack_examples` of the whole data set; with attention kept inside each example, which examples share a
    row changes no gradient); their order is shuffled per ``(seed, epoch)``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    packs = pack_examples(dataset.lengths, dataset.max_length if pack_length is None else pack_length)
    order = np.random.default_rng([seed, epoch]).permutation(len(packs)) if shuffle else np.arange(len(packs))
    ordered = [packs[i] for i in order]
    return [ordered[i:i + batch_size] for i in range(0, len(ordered), batch_size)]


def collate_packed(packs_ids: list[list[np.ndarray]], packs_labels: list[list[np.ndarray]], pad_token_id: int,
                   pad_to_multiple_of: int | None = None) -> dict[str, np.ndarray]:
    """One row per pack, its examples one after the other, right-padded like :func:`collate`; adds int64
    ``position_ids`` (0, 1, ... within every example, and within the padding, which is then a segment of its own).
    The first label of every example is -100: nothing predicts it from the example before."""
    rows_ids, rows_labels, rows_pos = [], [], []
    for ids, labels in zip(packs_ids, packs_labels, strict=True):
        rows_ids.append(np.concatenate(ids))
        rows_labels.append(np.concatenate([np.concatenate([[IGNORE_INDEX], y[1:]]) for y in labels]))
        rows_pos.append(np.concatenate([np.arange(len(x)) for x in ids]))
    batch = collate(rows_ids, rows_labels, pad_token_id, pad_to_multiple_of)
    t = batch["input_ids"].shape[1]
    batch["position_ids"] = np.stack([np.concatenate([p, np.arange(t - len(p))]) for p in rows_pos]).astype(np.int64)
    return batch


def batch_of(dataset: TokenizedDataset, indices: list, pad_to_multiple_of: int | None = None) -> dict[str, np.ndarray]:
    """The batch of ``indices``: a list of example indices (:func:`collate`, padded) or a list of packs, each a
    list of example indices (:func:`collate_packed`)."""
    d = dataset
    if indices and isinstance(indices[0], list):
        return collate_packed([[d.input_ids[i] for i in p] for p in indices],
                              [[d.labels[i] for i in p] for p in indices], d.pad_token_id, pad_to_multiple_of)
    return collate([d.input_ids[i] for i in indices], [d.labels[i] for i in indices], d.pad_token_id,
                   pad_to_multiple_of)


def iterate_packed_batches(dataset: TokenizedDataset, batch_size: int, shuffle: bool = True, seed: int = 0,
                           epoch: int = 0, pad_to_multiple_of: int | None = None, pack_length: int | None = None
                           ) -> Iterator[dict[str, np.ndarray]]:
    """Packed batches for one epoch (see :func:`packed_batch_indices` and :func:`collate_packed`)."""
    for packs in packed_batch_indices(dataset, batch_size, shuffle, seed, epoch, pack_length):
        yield batch_of(dataset, packs, pad_to_multiple_of)
