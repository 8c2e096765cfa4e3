"""The model's own tokenizer and chat template, from a Hugging Face folder or a GGUF file.

Built on the ``tokenizers`` package (the ``demo`` extra): a folder's ``tokenizer.json`` is read as it is; a GGUF
file's vocabulary is turned into the same kind of tokenizer: a byte-level BPE (``tokenizer.ggml.model == "gpt2"``:
tokens, merges, control tokens) as it is, a SentencePiece one (``"llama"``: tokens, scores, token types) as a BPE
whose merges replay llama.cpp's rule. The chat template (Jinja, from ``tokenizer_config.json``, ``chat_template.jinja``
or the GGUF key ``tokenizer.chat_template``) is rendered the way transformers renders it.
"""

from __future__ import annotations

from pathlib import Path

from ..files import read_json_object


def _import_tokenizers():
    try:
        import tokenizers
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("loading a tokenizer needs the 'tokenizers' package: pip install 'qlora[demo]'") from e
    return tokenizers


#: llama.cpp's token types (``tokenizer.ggml.token_type``)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

#: llama.cpp's split rules (``llama-vocab.cpp``) by ``tokenizer.ggml.pre``, as the models' own tokenizer.json
#: writes them: a BPE never merges across a split, so another rule gives other token ids (digit groups, ":\n",
#: "DON'T", a tab before a word), silently
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                 r"\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
GGUF_PRE_TOKENIZERS = {None: "gpt2", "gpt-2": "gpt2", "smollm": "smollm", "llama-bpe": _LLAMA3_SPLIT,
                       "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT}


def _gguf_pre_tokenizer(pre: str | None, source: str):
    """The pre-tokenizer of a GGUF byte-level BPE: GPT-2's rule (also for files that name none), SmolLM's (digits
    one by one, then GPT-2's), or Llama 3's / Qwen2's split; any other name is refused rather than guessed."""
    from tokenizers import Regex, pre_tokenizers

    if pre not in GGUF_PRE_TOKENIZERS:
        names = ", ".join(repr(k) for k in GGUF_PRE_TOKENIZERS if k)
        raise ValueError(f"{source}: tokenizer.ggml.pre={pre!r} is not supported (its split rule is not implemented "
                         f"here, and another rule gives other token ids); supported: {names}")
    rule = GGUF_PRE_TOKENIZERS[pre]
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=rule in ("gpt2", "smollm"))
    if rule == "gpt2":
        return byte_level
    if rule == "smollm":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(rule), behavior="isolated", invert=False), byte_level])


def _json_object(path: Path) -> dict:
    """A tokenizer file's JSON object ({} when the file is absent); a broken one is named."""
    return read_json_object(path) if path.exists() else {}


class Tokenizer:
    """encode / decode / apply_chat_template around a ``tokenizers.Tokenizer``."""

    def __init__(self, backend, chat_template: str | None = None, bos_token: str | None = None,
                 eos_token: str | None = None, add_bos_token: bool = False, pad_token: str | None = None):
        self.backend = backend
        self.chat_template = chat_template
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        self.add_bos_token = add_bos_token

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self.token_to_id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return self.token_to_id(self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        return self.token_to_id(self.pad_token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos_token and self.bos_token_id is not None:
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False,
                            tokenize: bool = False, tools: list | None = None):
        """Render the conversation with the model's template (a string, or token ids with ``tokenize``): sandboxed
        and bounded (``qlora_ref.data.render_chat_template``); a failing template is a ``ChatTemplateError``."""
        from ..data.tokenizer import render_chat_template

        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat template")
        text = render_chat_template(self.chat_template, messages, add_generation_prompt, tools,
                                    bos_token=self.bos_token or "", eos_token=self.eos_token or "")
        return self.encode(text, add_special_tokens=False) if tokenize else text

    # ----------------------------------------------------------------- sources
    @classmethod
    def from_folder(cls, folder) -> Tokenizer | None:
        """From tokenizer.json (+ tokenizer_config.json / chat_template.jinja); None if the folder has none. The
        BOS, EOS and pad tokens come from tokenizer_config.json and special_tokens_map.json, where many repositories
        (those older transformers saved) keep them: without its EOS the template-less format would train responses
        that never end. Where both name one, the map wins unless the config lists ``added_tokens_decoder`` (a
        folder of transformers >= 4.34), as ``AutoTokenizer`` decides."""
        folder = Path(folder)
        if not (folder / "tokenizer.json").exists():
            return None
        tokenizers = _import_tokenizers()
        backend = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
        cfg, special = (_json_object(folder / name) for name in ("tokenizer_config.json", "special_tokens_map.json"))
        first, second = (cfg, special) if "added_tokens_decoder" in cfg else (special, cfg)
        template = cfg.get("chat_template")
        if (folder / "chat_template.jinja").exists():
            template = (folder / "chat_template.jinja").read_text()

        def token(name):
            value = first.get(name) or second.get(name)
            return value.get("content") if isinstance(value, dict) else value

        return cls(backend, template, token("bos_token"), token("eos_token"), bool(cfg.get("add_bos_token", False)),
                   pad_token=token("pad_token"))

    @classmethod
    def from_gguf_metadata(cls, meta: dict, source: str = "model.gguf") -> Tokenizer | None:
        """The tokenizer a GGUF file describes (byte-level BPE ``"gpt2"`` or SentencePiece ``"llama"``); None if the
        file carries no tokenizer; any other ``tokenizer.ggml.model`` is refused."""
        model = meta.get("tokenizer.ggml.model")
        if model is None:
            return None
        if model == "llama":
            return cls._from_gguf_spm(meta, source)
        if model != "gpt2":
            raise ValueError(f"{source}: tokenizer.ggml.model={model!r} is not supported (supported: byte-level BPE "
                             f"'gpt2', SentencePiece 'llama')")
        tokenizers = _import_tokenizers()
        from tokenizers import decoders, models

        tokens = list(meta["tokenizer.ggml.tokens"])
        merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
        backend = tokenizers.Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
        backend.pre_tokenizer = _gguf_pre_tokenizer(meta.get("tokenizer.ggml.pre"), source)
        backend.decoder = decoders.ByteLevel()
        types = meta.get("tokenizer.ggml.token_type") or []
        control = [tok for tok, kind in zip(tokens, types, strict=False) if kind == CONTROL]
        backend.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in control])

        def tok(key):
            i = meta.get(key)
            return None if i is None else tokens[int(i)]

        return cls(backend, meta.get("tokenizer.chat_template"), tok("tokenizer.ggml.bos_token_id"),
                   tok("tokenizer.ggml.eos_token_id"), bool(meta.get("tokenizer.ggml.add_bos_token", False)))

    @classmethod
    def _from_gguf_spm(cls, meta: dict, source: str) -> Tokenizer:
        """A SentencePiece vocabulary as llama.cpp tokenizes it (``llm_tokenizer_spm``): text between special
        tokens gets a leading space (``tokenizer.ggml.add_space_prefix``, default true) and every space becomes
        "▁"; from its characters, the adjacent pair whose join is the best-scored token is merged, again and again;
        a character the vocabulary lacks becomes its UTF-8 bytes' ``<0xXX>`` tokens. That is a ``tokenizers`` BPE
        with byte fallback whose merges are ranked by the merged token's score (``_spm_merges``), under the
        normalizer of Llama 2's own tokenizer.json (Prepend "▁", Replace " " → "▁", applied to each stretch of
        text between added tokens, as llama.cpp prefixes the text after each special token). Control and unknown
        tokens are special added tokens, user-defined ones plain added tokens, all matched in the raw text as
        llama.cpp matches them. BOS is added unless ``tokenizer.ggml.add_bos_token`` is false; the BOS / EOS /
        unknown ids default to 1 / 2 / 0, as in llama.cpp."""
        tokenizers = _import_tokenizers()
        from tokenizers import decoders, models, normalizers

        tokens = list(meta["tokenizer.ggml.tokens"])
        scores = meta.get("tokenizer.ggml.scores")
        if scores is None or len(scores) != len(tokens):
            raise ValueError(f"{source}: a SentencePiece vocabulary (tokenizer.ggml.model='llama') needs "
                             f"tokenizer.ggml.scores, one float per token ({len(tokens)}), which order its merges; "
                             f"got {'none' if scores is None else len(scores)}")
        types = list(meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens))
        if len(types) != len(tokens):
            raise ValueError(f"{source}: tokenizer.ggml.token_type has {len(types)} entries, expected one per token "
                             f"({len(tokens)})")

        def token_id(key, default):
            i = int(meta.get(key, default))
            return i if 0 <= i < len(tokens) else None

        bos, eos, unk = (token_id(f"tokenizer.ggml.{name}_token_id", d) for name, d in
                         (("bos", 1), ("eos", 2), ("unknown", 0)))
        vocab = {t: i for i, t in enumerate(tokens)}
        backend = tokenizers.Tokenizer(models.BPE(vocab, _spm_merges(tokens, scores, types, vocab), fuse_unk=True,
                                                  byte_fallback=True, unk_token=None if unk is None else tokens[unk]))
        prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
        replace = normalizers.Replace(" ", "▁")
        backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), replace]) if prefix else replace
        steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        backend.decoder = decoders.Sequence(steps + [decoders.Strip(" ", 1, 0)] if prefix else steps)
        backend.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False)
                                    for t, kind in zip(tokens, types, strict=True) if kind in (CONTROL, UNKNOWN)])
        backend.add_tokens([tokenizers.AddedToken(t, special=False, normalized=False)
                            for t, kind in zip(tokens, types, strict=True) if kind == USER_DEFINED])
        return cls(backend, meta.get("tokenizer.chat_template"), None if bos is None else tokens[bos],
                   None if eos is None else tokens[eos], bool(meta.get("tokenizer.ggml.add_bos_token", True)))


def _spm_merges(tokens: list[str], scores, types, vocab: dict[str, int]) -> list[tuple[str, str]]:
    """Every split of a normal token into two vocabulary tokens, ranked by the token's score (highest first). A BPE
    applies the best-ranked pair present, as llama.cpp and sentencepiece merge the pair whose join scores best. Two
    tokens of equal score keep their vocabulary order, where llama.cpp takes the leftmost pair: the same ids unless
    a vocabulary repeats a score among its normal tokens (sentencepiece's BPE training gives each its own). Only
    normal tokens are targets, as in sentencepiece (control, byte, unused and user-defined tokens come from no
    merge; llama.cpp would merge into any token that two current symbols spell)."""
    ranked = sorted((i for i, kind in enumerate(types) if kind == NORMAL), key=lambda i: -float(scores[i]))
    return [(t[:k], t[k:]) for t in (tokens[i] for i in ranked) for k in range(1, len(t))
            if t[:k] in vocab and t[k:] in vocab]
