"""Instruction data: formats, chat templates, response-only labels, malformed input, length drops, batching,
and the shipped chatterbot corpus."""

from __future__ import annotations

import json

import numpy as np
import pytest

from qlora_ref.data import (
    ALPACA_PROMPT_INPUT,
    ALPACA_PROMPT_NO_INPUT,
    CHATML_TEMPLATE,
    IGNORE_INDEX,
    ByteTokenizer,
    ChatTemplateError,
    DataReport,
    MalformedRecordError,
    batch_indices,
    build_dataset,
    chatterbot_data_dir,
    collate,
    format_example,
    iterate_batches,
    length_grouped_order,
    load_chatterbot_corpus,
    load_examples,
    prompt_ids,
    read_chatterbot_yaml,
    read_jsonl,
    record_to_example,
    render_chat_template,
    split_turns,
    tokenize_example,
)

TOK = ByteTokenizer()
CHAT = ByteTokenizer(CHATML_TEMPLATE)


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _response_text(tok, ids, labels):
    return tok.decode([i for i, lab in zip(ids, labels, strict=True) if lab != IGNORE_INDEX])


# ------------------------------------------------------------------------------------------------ formats
def test_each_format_is_parsed(tmp_path):
    records = [
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
        {"instruction": "Say hi.", "output": "Hi!"},
        {"input": "Capital of France?", "output": "Paris."},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q1"},
                      {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"},
                      {"role": "assistant", "content": "A2"}]},
        {"messages": [{"role": "prompter", "content": "oasst q"}, {"role": "assistant", "content": "oasst a"}]},
        {"conversations": [{"from": "human", "value": "sharegpt q"}, {"from": "gpt", "value": "sharegpt a"}]},
        {"text": "### Human: guanaco q### Assistant: guanaco a### Human: again### Assistant: and again"},
    ]
    report = DataReport()
    ex = read_jsonl(_write_jsonl(tmp_path / "d.jsonl", records), report)
    assert report.records == 7 and report.kept == 7 and not report.dropped
    assert ex[0].messages == [{"role": "user", "content": "Add the numbers.\n\n2 and 3"},
                              {"role": "assistant", "content": "5"}]
    assert ex[0].alpaca == ("Add the numbers.", "2 and 3") and ex[1].alpaca == ("Say hi.", "")
    assert ex[2].messages[0] == {"role": "user", "content": "Capital of France?"} and ex[2].alpaca is None
    assert [m["role"] for m in ex[3].messages] == ["system", "user", "assistant", "user", "assistant"]
    assert ex[4].messages[0]["role"] == "user"
    assert ex[5].messages[1] == {"role": "assistant", "content": "sharegpt a"}
    assert [m["content"] for m in ex[6].messages] == ["guanaco q", "guanaco a", "again", "and again"]
    assert ex[3].source == f"{tmp_path / 'd.jsonl'}:4"


def test_alpaca_prompt_without_template_is_the_papers(tmp_path):
    ex = record_to_example({"instruction": "Add.", "input": "2 and 3", "output": "5"}, "x:1")
    ids, labels = tokenize_example(ex, TOK)
    prompt = ALPACA_PROMPT_INPUT.format(instruction="Add.", input="2 and 3")
    assert ids == [TOK.bos_token_id, *prompt.encode(), *b"5", TOK.eos_token_id]
    assert labels == [IGNORE_INDEX] * (1 + len(prompt.encode())) + [*b"5", TOK.eos_token_id]
    ex = record_to_example({"instruction": "Say hi.", "output": "Hi"}, "x:2")
    ids, _ = tokenize_example(ex, TOK)
    assert TOK.decode(ids) == "<s>" + ALPACA_PROMPT_NO_INPUT.format(instruction="Say hi.") + "Hi</s>"


def test_pairs_and_guanaco_text_take_the_alpaca_prompt_not_qlora_pys_layout():
    """The documented divergence (docs/divergences.md): without a chat template, qlora.py's input-output format
    prompts with the raw input ("<s>q" + "a</s>") and its oasst1 format trains on the whole "### Human: ...
    ### Assistant: ..." text; here both become messages rendered with the Alpaca prompt, loss on the response."""
    pair = record_to_example({"input": "q", "output": "a"}, "x:1")
    guanaco = record_to_example({"text": "### Human: q### Assistant: a"}, "x:2")
    alpaca = ALPACA_PROMPT_NO_INPUT.format(instruction="q")
    for ex in (pair, guanaco):
        ids, labels = tokenize_example(ex, TOK)
        assert ids == [TOK.bos_token_id, *alpaca.encode(), *b"a", TOK.eos_token_id]
        assert ids != [TOK.bos_token_id, *b"q", *b"a", TOK.eos_token_id]  # qlora.py's input-output layout
        assert b"### Human:" not in TOK.decode(ids).encode()  # qlora.py's oasst1 text
        assert labels == [IGNORE_INDEX] * (1 + len(alpaca.encode())) + [*b"a", TOK.eos_token_id]


def test_labels_mask_the_prompt_and_train_on_source_does_not():
    ex = record_to_example({"input": "question?", "output": "answer."}, "x:1")
    for tok, response in ((TOK, "answer.</s>"), (CHAT, "answer.<|im_end|>\n")):
        ids, labels = tokenize_example(ex, tok)
        assert _response_text(tok, ids, labels) == response
        assert labels[: len(ids) - len(response.replace("</s>", "x").encode())] == [IGNORE_INDEX] * (
            len(ids) - len(response.replace("</s>", "x").encode()))
        ids2, labels2 = tokenize_example(ex, tok, train_on_source=True)
        assert ids2 == ids and labels2 == ids


def test_chat_template_multi_turn_trains_on_every_assistant_turn():
    ex = record_to_example({"messages": [
        {"role": "system", "content": "S"}, {"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}]}, "x:1")
    ids, labels = tokenize_example(ex, CHAT)
    assert CHAT.decode(ids) == render_chat_template(CHATML_TEMPLATE, ex.messages)
    assert _response_text(CHAT, ids, labels) == "A1<|im_end|>\nA2<|im_end|>\n"
    # fallback format without a template: both answers trained, each closed by EOS
    ids, labels = tokenize_example(ex, TOK)
    assert _response_text(TOK, ids, labels) == "A1</s>A2</s>"
    assert TOK.decode(ids).startswith("<s>S\n\n### Instruction:\nQ1")


def test_the_generation_prompt_is_the_training_prompt():
    """``prompt_ids`` (what ``qlora generate`` and ``qlora demo`` answer) is the prompt part of a training example of
    the same question: the chat template's generation prompt, or BOS + the paper's Alpaca prompt without one."""
    question = [{"role": "user", "content": "What is a wavelength?"}]
    ex = record_to_example({"messages": [*question, {"role": "assistant", "content": "A distance."}]}, "x:1")
    for tok in (TOK, CHAT):
        ids, labels = tokenize_example(ex, tok)
        n_prompt = labels.index(next(lab for lab in labels if lab != IGNORE_INDEX))
        assert prompt_ids(tok, question) == ids[:n_prompt]
    assert prompt_ids(CHAT, question) == list(render_chat_template(CHATML_TEMPLATE, question, True).encode())
    assert prompt_ids(TOK, question) == [TOK.bos_token_id,
                                         *ALPACA_PROMPT_NO_INPUT.format(instruction=question[0]["content"]).encode()]
    # a follow-up question: the earlier turns formatted as training formats them
    turns = [*ex.messages, {"role": "user", "content": "And a frequency?"}]
    assert CHAT.decode(prompt_ids(CHAT, turns)) == render_chat_template(CHATML_TEMPLATE, turns, True)
    assert TOK.decode(prompt_ids(TOK, turns)).endswith("A distance.</s>\n\n### Instruction:\nAnd a frequency?"
                                                       "\n\n### Response: ")
    with pytest.raises(ValueError, match="must end with a user"):
        prompt_ids(TOK, ex.messages)


def test_a_template_that_is_not_prefix_consistent_is_refused():
    odd = "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}>>{% endif %}"
    ex = record_to_example({"input": "q", "output": "a"}, "f.jsonl:3")
    with pytest.raises(ChatTemplateError, match="f.jsonl:3"):
        tokenize_example(ex, ByteTokenizer(odd))


#: written for these tests after Qwen3's template (Qwen/Qwen3-8B tokenizer_config.json): an assistant turn after
#: the last user message opens with a reasoning block (here always empty), earlier ones without — so the history
#: is rendered differently once a new user message follows it
REWRITING = (
    "{%- set ns = namespace(last_user=-1) %}"
    "{%- for m in messages %}{%- if m.role == 'user' %}{%- set ns.last_user = loop.index0 %}{%- endif %}{%- endfor %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' and loop.index0 > ns.last_user %}"
    "{{- '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' + m.content + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")


def test_a_template_that_rewrites_history_trains_each_turn_as_it_is_answered():
    """Qwen3-style: one example per assistant turn, its prompt the conversation before it with the generation
    prompt (what ``prompt_ids`` gives the model at inference), trained on that turn alone."""
    tok = ByteTokenizer(REWRITING)
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q1"},
            {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"},
            {"role": "assistant", "content": "A2"}, {"role": "user", "content": "Q3"},
            {"role": "assistant", "content": "A3"}]
    conversation = record_to_example({"messages": msgs}, "x:1")
    report = DataReport(records=2, kept=2)
    with pytest.warns(UserWarning, match="1 conversation split into 3 examples, one per assistant turn"):
        data = build_dataset([conversation, record_to_example({"input": "q", "output": "a"}, "x:2")], tok, 400,
                             report=report)
    assert data.sources == ["x:1 (turn 1)", "x:1 (turn 2)", "x:1 (turn 3)", "x:2"]
    assert (report.split, report.split_examples, report.kept) == (1, 3, 4)
    assert report.records + report.split_examples - report.split == report.kept + report.n_dropped
    for k, end in enumerate((2, 4, 6)):
        ids, labels = data.input_ids[k].tolist(), data.labels[k].tolist()
        assert tok.decode(ids) == render_chat_template(REWRITING, msgs[: end + 1])
        answer = msgs[end]["content"]
        assert _response_text(tok, ids, labels) == f"<think>\n\n</think>\n\n{answer}<|im_end|>\n"
        n_prompt = labels.index(next(lab for lab in labels if lab != IGNORE_INDEX))
        assert ids[:n_prompt] == prompt_ids(tok, msgs[:end])  # the inference prompt, history without <think>
    assert tok.decode(data.input_ids[2].tolist()).count("<think>") == 1
    # a turn too long with its history is dropped alone; the turns before it stay
    report = DataReport(records=1, kept=1)
    short = build_dataset([conversation], tok, len(data.input_ids[1]), report=report, warn=False)
    assert short.sources == ["x:1 (turn 1)", "x:1 (turn 2)"] and report.dropped[
        f"longer than max_length={len(data.input_ids[1])} tokens"] == 1 and "x:1 (turn 3)" in report.summary()
    # train_on_source: each turn's sequence trained whole
    whole = build_dataset([conversation], tok, 400, train_on_source=True, warn=False)
    assert all((y == x).all() for x, y in zip(whole.input_ids, whole.labels, strict=True))
    # a prefix-consistent template keeps the conversation one sequence
    one = build_dataset([conversation], CHAT, 400, warn=False)
    assert one.sources == ["x:1"] and one.report.split == 0


def test_split_turns_follow_the_generation_prompt_of_transformers():
    """The split turns' texts are transformers' own renderings of the same template."""
    transformers, tokenizers = pytest.importorskip("transformers"), pytest.importorskip("tokenizers")
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel({"<unk>": 0}, unk_token="<unk>"))
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, chat_template=REWRITING)
    msgs = [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
            {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}]
    turns = split_turns(record_to_example({"messages": msgs}, "x:1"))
    for turn, end in zip(turns, (1, 3), strict=True):
        (prompt, _), (response, _) = format_example(turn, ByteTokenizer(REWRITING))
        assert prompt == hf.apply_chat_template(msgs[:end], tokenize=False, add_generation_prompt=True)
        assert prompt + response == hf.apply_chat_template(msgs[: end + 1], tokenize=False)


def test_hf_style_tokenizer_is_used_through_the_interface():
    """Any object with encode / apply_chat_template works; encode gets add_special_tokens=False if it takes it."""

    class Tok:
        eos_token_id, bos_token_id, pad_token_id = 1, 0, None
        chat_template = CHATML_TEMPLATE

        def encode(self, text, add_special_tokens=True):
            return ([0] if add_special_tokens else []) + [2 + (ord(c) % 50) for c in text]

        def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
            return render_chat_template(self.chat_template, messages, add_generation_prompt)

    ex = record_to_example({"input": "hi", "output": "yo"}, "x:1")
    ids, labels = tokenize_example(ex, Tok())
    assert 0 not in ids  # no BOS added: the template owns the layout
    data = build_dataset([ex], Tok(), max_length=100)
    assert data.pad_token_id == 1  # pad falls back to EOS


# ------------------------------------------------------------------------------------------------ malformed
@pytest.mark.parametrize("line, message", [
    ('{"instruction": "x", "output": "y"', "invalid JSON"),
    ('[1, 2]', "must be a JSON object"),
    ('{"question": "x", "answer": "y"}', "unrecognised record"),
    ('{"instruction": "x"}', "needs 'output'"),
    ('{"input": 3, "output": "y"}', "must be a string"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}', "alternate"),
    ('{"messages": [{"role": "wizard", "content": "a"}]}', "unknown role"),
    ('{"messages": [{"role": "user", "content": "a"}]}', "no assistant turn"),
    ('{"text": "no markers here"}', "Human"),
])
def test_malformed_record_names_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"input": "fine", "output": "ok"}\n\n' + line + "\n", encoding="utf-8")
    with pytest.raises(MalformedRecordError, match=message) as e:
        read_jsonl(path)
    assert str(e.value).startswith(f"{path}:3: ")
    report = DataReport()
    assert len(read_jsonl(path, report, on_malformed="drop")) == 1
    assert report.dropped["malformed record"] == 1 and f"{path}:3" in report.summary()


def test_unanswered_last_turn_is_trimmed_and_counted(tmp_path):
    report = DataReport()
    ex = read_jsonl(_write_jsonl(tmp_path / "d.jsonl", [{"conversations": [
        {"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}, {"from": "human", "value": "q2"}]}]), report)
    assert [m["content"] for m in ex[0].messages] == ["q", "a"]
    assert report.trimmed["unanswered last user turn"] == 1


# ------------------------------------------------------------------------------------------------ lengths
def test_dropped_for_length_are_counted_and_reported(tmp_path):
    records = [{"input": "q" * n, "output": "a"} for n in (5, 500, 10, 700)]
    report = DataReport()
    examples = read_jsonl(_write_jsonl(tmp_path / "d.jsonl", records), report)
    with pytest.warns(UserWarning, match=r"2 dropped: longer than max_length=300"):
        data = build_dataset(examples, TOK, max_length=300, report=report)
    assert len(data) == 2 and report.kept == 2 and report.records == 4
    assert report.dropped["longer than max_length=300 tokens"] == 2
    assert f"{tmp_path / 'd.jsonl'}:2" in report.summary() and f"{tmp_path / 'd.jsonl'}:4" in report.summary()
    assert all(len(x) <= 300 for x in data.input_ids)


def test_an_example_of_exactly_max_length_tokens_is_kept_and_one_more_is_dropped():
    """The boundary of the length filter: only examples *longer* than max_length are dropped. Dropping at
    ``>=`` passed every test and would silently lose every example that exactly fills the context."""
    ex = record_to_example({"input": "q" * 20, "output": "a" * 5}, "x:1")
    n = len(tokenize_example(ex, TOK)[0])
    kept = build_dataset([ex], TOK, max_length=n)
    assert len(kept) == 1 and len(kept.input_ids[0]) == n and not kept.report.dropped
    with pytest.warns(UserWarning, match=f"1 dropped: longer than max_length={n - 1}"):
        dropped = build_dataset([ex], TOK, max_length=n - 1)
    assert len(dropped) == 0 and dropped.report.dropped[f"longer than max_length={n - 1} tokens"] == 1


def test_no_response_token_is_dropped_and_counted():
    ex = record_to_example({"input": "q", "output": ""}, "x:1")
    tok = ByteTokenizer()
    tok.eos_token_id = None  # empty output and no EOS: nothing to learn
    with pytest.warns(UserWarning, match="no response token"), pytest.warns(UserWarning, match="learn to stop"):
        data = build_dataset([ex], tok, max_length=1000)
    assert len(data) == 0 and data.report.dropped["no response token"] == 1


# ------------------------------------------------------------------------------------------------ batches
def _dataset(n=40, seed=0):
    rng = np.random.default_rng(seed)
    examples = [record_to_example({"input": "q" * int(rng.integers(1, 60)), "output": "a" * int(rng.integers(1, 30))},
                                  f"x:{i}") for i in range(n)]
    return build_dataset(examples, TOK, max_length=1000)


def test_batches_are_padded_with_masks_and_ignored_labels():
    data = _dataset()
    seen = []
    for batch in iterate_batches(data, batch_size=8, seed=1):
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        assert ids.dtype == mask.dtype == labels.dtype == np.int64 and ids.shape == mask.shape == labels.shape
        lengths = mask.sum(1)
        assert ids.shape[1] == lengths.max()
        for row in range(ids.shape[0]):
            n = lengths[row]
            assert mask[row, :n].all() and not mask[row, n:].any()  # right padding
            assert (ids[row, n:] == TOK.pad_token_id).all() and (labels[row, n:] == IGNORE_INDEX).all()
            seen.append(tuple(ids[row, :n]))
    assert sorted(seen) == sorted(tuple(x) for x in data.input_ids)  # every example exactly once


def test_pad_to_multiple_of():
    b = collate([np.arange(5), np.arange(3)], [np.arange(5), np.arange(3)], pad_token_id=0, pad_to_multiple_of=8)
    assert b["input_ids"].shape == (2, 8) and b["attention_mask"].sum() == 8


def test_length_grouping_groups_similar_lengths_longest_first_and_is_deterministic():
    data = _dataset(n=400)
    lengths = data.lengths
    grouped = batch_indices(data, batch_size=8, group_by_length=True, seed=3)
    plain = batch_indices(data, batch_size=8, group_by_length=False, seed=3)
    assert batch_indices(data, 8, group_by_length=True, seed=3) == grouped
    assert batch_indices(data, 8, group_by_length=True, seed=3, epoch=1) != grouped
    assert max(lengths[grouped[0]]) == lengths.max()  # the longest batch first, as transformers does

    def padding(batches):
        return sum(len(b) * max(lengths[b]) - sum(lengths[b]) for b in batches)

    assert padding(grouped) < 0.5 * padding(plain)
    assert sorted(i for b in grouped for i in b) == list(range(len(data)))


def test_length_grouped_order_matches_transformers_algorithm():
    """Same algorithm as transformers' get_length_grouped_indices, given the same permutation."""
    import torch
    from transformers import trainer_pt_utils
    lengths = list(np.random.default_rng(0).integers(1, 100, size=300))
    g = torch.Generator().manual_seed(0)
    theirs = trainer_pt_utils.get_length_grouped_indices(lengths, batch_size=4, generator=g)
    perm = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(0)).numpy()

    class FixedPerm:
        def permutation(self, n):
            return perm

    ours = length_grouped_order(lengths, 4, FixedPerm())
    assert [lengths[i] for i in ours] == [lengths[i] for i in theirs]


# ------------------------------------------------------------------------------------------------ chatterbot
def test_chatterbot_corpus_loads():
    if chatterbot_data_dir() is None:
        pytest.skip("chatterbot-corpus is not installed (it is in the demo and test extras: pip install 'qlora[demo]')")
    report = DataReport()
    examples = load_chatterbot_corpus("english", report=report)
    assert len(examples) > 800 and report.kept == len(examples)
    # the one flawed entry of chatterbot-corpus 1.3.3 is counted with its file and line, not lost silently
    assert report.records == report.kept + report.n_dropped
    # and so are its copies (tech_support.yml: 10 conversations written 105 times): none is kept, so no held-out
    # pair of any split is a training pair
    keys = [tuple((m["role"], m["content"]) for m in ex.messages) for ex in examples]
    assert len(set(keys)) == len(keys)
    copies = report.dropped["a copy of an earlier entry"]
    assert copies > 1000 and report.records == len(examples) + copies + report.dropped["malformed record"]
    assert "chatterbot_corpus/english/" in report.summary() and " = chatterbot_corpus/english/" in report.summary()
    from qlora_ref.train.api import split_examples

    train, held = split_examples(examples, 0.05, 0)
    assert not {tuple((m["role"], m["content"]) for m in e.messages) for e in held} & {
        tuple((m["role"], m["content"]) for m in e.messages) for e in train}
    assert all(ex.messages[-1]["role"] == "assistant" for ex in examples)
    greetings = load_examples("chatterbot:english:greetings")
    assert greetings[0].messages == [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi"}]
    assert greetings[0].source.startswith("chatterbot_corpus/english/greetings.yml:")
    data = build_dataset(examples, CHAT, max_length=256, warn=False)
    assert len(data) > 0.85 * len(examples)  # most pairs fit 256 tokens
    with pytest.raises(ValueError, match="categories"):
        load_chatterbot_corpus("english", ["no-such-category"])


def test_chatterbot_style_yaml_file_errors_name_file_and_line(tmp_path):
    path = tmp_path / "mine.yml"
    path.write_text("categories:\n- mine\nconversations:\n- - Hello\n  - Hi\n- - Lonely\n- - a\n  - - nested\n",
                    encoding="utf-8")
    with pytest.raises(MalformedRecordError, match=f"{path}:8: a conversation line must be text"):
        load_examples(path)
    report = DataReport()
    ex = read_chatterbot_yaml(path, report, on_malformed="drop")
    assert len(ex) == 1 and report.dropped["chatterbot conversation with a single line"] == 1
    assert report.dropped["malformed record"] == 1
