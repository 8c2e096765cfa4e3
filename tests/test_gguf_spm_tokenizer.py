"""GGUF files whose tokenizer is SentencePiece (``tokenizer.ggml.model == "llama"``: Llama 2, Mistral 7B, TinyLlama).

Peers: sentencepiece itself (a BPE model trained here the way Llama 2's was configured, turned into GGUF metadata as
llama.cpp's ``convert_hf_to_gguf.py`` does), transformers' GGUF tokenizer conversion (on the texts where it follows
sentencepiece, below), and small vocabularies whose token ids are worked out by hand from llama.cpp's rule.
"""

from __future__ import annotations

import io

import pytest
import sentencepiece
from hypothesis import assume, given
from hypothesis import strategies as st
from model_helpers import small_hf_model
from test_model_loading import write_gguf

from qlora_ref.model import load_model
from qlora_ref.model.tokenizer import Tokenizer

CORPUS = ["The quick brown fox jumps over the lazy dog.", "  Leading spaces,   runs of spaces and\ttabs.",
          "Numbers 12345 and 2024-06-01; café, naïve, über, 東京 and emoji 🙂.", "line one\nline two\n\nline four",
          "def f(x):\n    return x ** 2  # square", "Hello hello HELLO world worlds wordy [INST] [/INST]"]
SPECIALS = ("<unk>", "<s>", "</s>")


def train_spm(add_dummy_prefix: bool = True) -> sentencepiece.SentencePieceProcessor:
    """A small BPE SentencePiece model with Llama 2's trainer settings (identity normalization, no whitespace
    squeezing, digits split, byte fallback, <unk>/<s>/</s> at 0/1/2)."""
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 20), model_writer=model, model_type="bpe", vocab_size=400,
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=add_dummy_prefix, split_digits=True, allow_whitespace_only_pieces=True,
        character_coverage=1.0, hard_vocab_limit=False, minloglevel=2, num_threads=1)
    return sentencepiece.SentencePieceProcessor(model_proto=model.getvalue())


def gguf_metadata(sp, add_space_prefix: bool | None = None, **extra) -> dict:
    """``sp`` as llama.cpp's ``_create_vocab_sentencepiece`` writes it: pieces, scores, and the token type from
    IsUnknown (2) / IsControl (3) / IsUnused (5) / IsByte (6), else normal (1); the special ids as SpecialVocab."""
    n = sp.vocab_size()
    types = [2 if sp.IsUnknown(i) else 3 if sp.IsControl(i) else 5 if sp.IsUnused(i) else 6 if sp.IsByte(i) else 1
             for i in range(n)]
    meta = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": "default",
            "tokenizer.ggml.tokens": [sp.IdToPiece(i) for i in range(n)],
            "tokenizer.ggml.scores": [sp.GetScore(i) for i in range(n)], "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.bos_token_id": sp.bos_id(), "tokenizer.ggml.eos_token_id": sp.eos_id(),
            "tokenizer.ggml.unknown_token_id": sp.unk_id(), **extra}
    if add_space_prefix is not None:
        meta["tokenizer.ggml.add_space_prefix"] = add_space_prefix
    return meta


@pytest.fixture(scope="module")
def spm():
    sp = train_spm()
    assert sp.vocab_size() > 300 and sp.unk_id() == 0 and sp.bos_id() == 1 and sp.eos_id() == 2
    return sp, Tokenizer.from_gguf_metadata(gguf_metadata(sp), "m.gguf")


#: texts: words of the corpus (so merges apply), runs of spaces, leading spaces, newlines, tabs, digits, and any
#: character (those not in the vocabulary fall back to their bytes)
TEXTS = st.lists(st.one_of(st.sampled_from(" ".join(CORPUS).split()), st.sampled_from([" ", "  ", "   ", "\n", "\t"]),
                           st.from_regex(r"[0-9]{1,6}", fullmatch=True), st.text(max_size=4)),
                 max_size=12).map("".join)


@given(text=TEXTS)
def test_spm_ids_and_decoding_equal_sentencepiece(spm, text):
    sp, ours = spm
    assume(not any(s in text for s in SPECIALS))  # sentencepiece never reads control tokens in text; llama.cpp does
    ids = sp.encode(text)
    assert ours.encode(text, add_special_tokens=False) == ids
    assert ours.encode(text) == sp.encode(text, add_bos=True)  # add_bos_token absent: BOS, as llama.cpp
    assert ours.decode(ids) == sp.decode(ids) == text


@pytest.fixture(scope="module")
def spm_without_prefix():
    sp = train_spm(add_dummy_prefix=False)
    meta = gguf_metadata(sp, add_space_prefix=False, **{"tokenizer.ggml.add_bos_token": False})
    return sp, Tokenizer.from_gguf_metadata(meta, "m.gguf")


@given(text=TEXTS)
def test_spm_without_space_prefix_equals_sentencepiece_without_dummy_prefix(spm_without_prefix, text):
    assume(not any(s in text for s in SPECIALS))
    sp, ours = spm_without_prefix
    assert ours.encode(text) == sp.encode(text)
    assert ours.decode(sp.encode(text)) == sp.decode(sp.encode(text)) == text


@given(head=TEXTS, rest=st.lists(st.tuples(st.sampled_from(SPECIALS), TEXTS), min_size=1, max_size=3))
def test_spm_text_between_special_tokens_is_tokenized_as_llama_cpp_does(spm, head, rest):
    """llama.cpp (llama-vocab.cpp, ``tokenize`` for SPM) cuts the text at special tokens and tokenizes each stretch
    on its own, prefixing a space to it after a special token: the ids are sentencepiece's per stretch."""
    sp, ours = spm
    text = head + "".join(special + part for special, part in rest)
    assume(sum(text.count(s) for s in SPECIALS) == len(rest))
    want = sp.encode(head) + [i for special, part in rest for i in [sp.PieceToId(special), *sp.encode(part)]]
    assert ours.encode(text, add_special_tokens=False) == want


def test_spm_chat_template_renders_and_tokenizes_as_llama_cpp(spm):
    sp, _ = spm
    template = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
                "{% else %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")
    tok = Tokenizer.from_gguf_metadata({**gguf_metadata(sp), "tokenizer.chat_template": template}, "m.gguf")
    chat = [{"role": "user", "content": "hello world"}, {"role": "assistant", "content": "quick fox"}]
    assert tok.apply_chat_template(chat) == "<s>[INST] hello world [/INST] quick fox</s>"
    want = [1, *sp.encode("[INST] hello world [/INST] quick fox"), 2]
    assert tok.apply_chat_template(chat, tokenize=True) == want
    assert (tok.bos_token, tok.eos_token, tok.bos_token_id, tok.eos_token_id) == ("<s>", "</s>", 1, 2)


def test_a_templated_example_is_tokenized_whole_as_llama_cpp_tokenizes_the_conversation(spm):
    """The training sequence of a chat is the rendered conversation tokenized once — what llama.cpp and
    transformers feed the model — cut at the answers: tokenized segment by segment, SentencePiece's "▁" before
    every text would open each answer with a token of its own. The generation prompt is the same prefix."""
    from qlora_ref.data import IGNORE_INDEX, format_example, prompt_ids, record_to_example, tokenize_example

    sp, _ = spm
    template = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
                "{% else %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")
    tok = Tokenizer.from_gguf_metadata({**gguf_metadata(sp), "tokenizer.chat_template": template}, "m.gguf")
    chat = [{"role": "user", "content": "hello world"}, {"role": "assistant", "content": "quick fox"},
            {"role": "user", "content": "lazy dog"}, {"role": "assistant", "content": "jumps over"}]
    example = record_to_example({"messages": chat}, "x:1")
    ids, labels = tokenize_example(example, tok)
    assert ids == tok.apply_chat_template(chat, tokenize=True) == [
        1, *sp.encode("[INST] hello world [/INST] quick fox"), 2, *sp.encode("[INST] lazy dog [/INST] jumps over"), 2]
    answers = [i for i, lab in zip(ids, labels, strict=True) if lab != IGNORE_INDEX]
    assert answers == [*sp.encode("quick fox"), 2, *sp.encode("jumps over"), 2]  # "▁quick": the space is the answer's
    assert prompt_ids(tok, chat[:3]) == ids[:len(ids) - len(sp.encode("jumps over")) - 1]
    separately = [i for text, _ in format_example(example, tok) for i in tok.encode(text, add_special_tokens=False)]
    assert separately != ids  # why: each segment would get a "▁" of its own


def test_spm_merges_by_score_worked_by_hand():
    """llama.cpp's rule on a vocabulary built for it: "abc" is "▁abc" after the space prefix; the candidate joins
    are "▁a" (score -5), "ab" (-2), "bc" (-1): "bc" first, then "abc" (-3) beats "▁a"; "▁abc" is no token, so
    [▁, abc] — merging left to right, or by longest match, would give other ids. "é" is not in the vocabulary: its
    UTF-8 bytes C3 A9. A user-defined token is matched whole in the raw text, and the text after it gets a space
    prefix as after any token llama.cpp matched (is_prev_special)."""
    tokens = ["<unk>", "<s>", "</s>", "▁", "a", "b", "c", "▁a", "ab", "bc", "abc", "<0xC3>", "<0xA9>", "<t>"]
    scores = [0, 0, 0, -10, -11, -12, -13, -5, -2, -1, -3, 0, 0, 0]
    types = [2, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 6, 6, 4]
    tok = Tokenizer.from_gguf_metadata({"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
                                        "tokenizer.ggml.scores": scores, "tokenizer.ggml.token_type": types})
    assert tok.encode("abc", add_special_tokens=False) == [3, 10]
    assert tok.encode("abc") == [1, 3, 10]  # no add_bos_token key: BOS (id 1 by llama.cpp's default)
    assert tok.encode("ab é") == [1, 3, 8, 3, 11, 12]  # "ab" (-2) beats "▁a" (-5), the leftmost pair
    assert tok.encode("a<t>b", add_special_tokens=False) == [7, 13, 3, 5]
    assert tok.encode("</s>a", add_special_tokens=False) == [2, 7]
    assert tok.decode([1, 3, 10, 3, 11, 12]) == "<s> abc é"
    assert tok.decode([3, 10, 3, 11, 12]) == "abc é"
    assert (tok.bos_token, tok.eos_token) == ("<s>", "</s>")


def test_spm_refuses_missing_scores_naming_the_key():
    meta = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["<unk>", "<s>", "</s>", "▁"]}
    with pytest.raises(ValueError, match=r"m\.gguf: .*tokenizer\.ggml\.scores, one float per token \(4\).*got none"):
        Tokenizer.from_gguf_metadata(meta, "m.gguf")
    with pytest.raises(ValueError, match=r"m\.gguf: tokenizer\.ggml\.model='t5' is not supported"):
        Tokenizer.from_gguf_metadata({**meta, "tokenizer.ggml.model": "t5"}, "m.gguf")


def add_spm_writer(monkeypatch, meta: dict):
    """Make ``write_gguf`` (tests/test_model_loading.py) write ``meta``'s SentencePiece tokenizer into its file."""
    import gguf

    class Writer(gguf.GGUFWriter):
        def write_header_to_file(self, *args, **kwargs):
            self.add_tokenizer_model("llama")
            self.add_tokenizer_pre("default")
            self.add_token_list(meta["tokenizer.ggml.tokens"])
            self.add_token_scores(meta["tokenizer.ggml.scores"])
            self.add_token_types(meta["tokenizer.ggml.token_type"])
            self.add_bos_token_id(meta["tokenizer.ggml.bos_token_id"])
            self.add_eos_token_id(meta["tokenizer.ggml.eos_token_id"])
            self.add_unk_token_id(meta["tokenizer.ggml.unknown_token_id"])
            self.add_add_bos_token(True)
            if "tokenizer.chat_template" in meta:
                self.add_chat_template(meta["tokenizer.chat_template"])
            super().write_header_to_file(*args, **kwargs)

    monkeypatch.setattr(gguf, "GGUFWriter", Writer)


#: texts where transformers' conversion follows sentencepiece: none starts with a space or holds a special token
HF_TEXTS = [text for text in CORPUS if not text.startswith(" ")] + [
    "hello  world", "x\n y", "Zebra ☃ ħ 0x7f", "tabs\tand\n\nnewlines ", "[INST] quick [/INST]", "🙂🙂 12345678"]


def test_spm_gguf_model_loads_and_equals_transformers_gguf_tokenizer(spm, tmp_path, monkeypatch):
    """A tiny Llama GGUF with this SentencePiece vocabulary loads through load_model with its tokenizer and chat
    template; transformers' AutoTokenizer reading the same file gives the same ids on HF_TEXTS. (Elsewhere it does
    not: it prefixes "▁" with a Metaspace pre-tokenizer, which adds none to text already starting with a space
    ("  hi": ▁▁hi, where sentencepiece and llama.cpp give ▁▁▁hi) and, with prepend_scheme "first", none to the text
    after a special token ("<s>[INST]": [INST] without the ▁ llama.cpp prefixes).)"""
    from transformers import AutoTokenizer

    sp, ours = spm
    template = "{{ bos_token }}{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}"
    meta = {**gguf_metadata(sp), "tokenizer.chat_template": template}
    hf = small_hf_model("llama-gqa")
    hf.resize_token_embeddings(sp.vocab_size())
    hf.config.vocab_size = sp.vocab_size()
    add_spm_writer(monkeypatch, meta)
    tok = load_model(write_gguf(hf, tmp_path / "spm.gguf", with_tokenizer=False)).tokenizer
    theirs = AutoTokenizer.from_pretrained(tmp_path, gguf_file="spm.gguf")
    assert tok.vocab_size == len(theirs) == sp.vocab_size()
    for text in HF_TEXTS:
        want = sp.encode(text, add_bos=True)
        assert tok.encode(text) == want, text
        assert theirs.encode(text) == want, text
        assert tok.decode(want, skip_special_tokens=True) == theirs.decode(want, skip_special_tokens=True) == text
    chat = tok.apply_chat_template([{"role": "user", "content": "quick fox"}], tokenize=True)
    assert chat == [1, *sp.encode("[INST] quick fox [/INST]")]
    # the documented difference (docs/divergences.md): transformers leaves out the "▁" that sentencepiece and
    # llama.cpp put before text that starts with a space, and before the text after a special token
    # ("  hi" as if it were " hi"; "hello" after </s> without its "▁" piece)
    assert sp.IdToPiece(sp.encode("hello")[0]) == "▁"
    for text, want, transformers_ids in (("  hi", sp.encode("  hi", add_bos=True), sp.encode(" hi", add_bos=True)),
                                         ("</s>hello", [1, 2, *sp.encode("hello")], [1, 2, *sp.encode("hello")[1:]])):
        assert tok.encode(text) == want != transformers_ids == theirs.encode(text), text
