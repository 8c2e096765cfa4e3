"""Fuzzing the inputs a user (careless or hostile) hands us: safetensors headers, JSONL records, adapter folders,
training configs and command-line values. Each property says what must hold for *every* input: a clear error of
the documented kind naming the file/line/option, or a result that satisfies the contract — never a traceback of
another kind, never a silent wrong value.

Runs in the default profile (``ci``: derandomized, a few hundred cases per property, seconds in all); the
``thorough`` profile (``HYPOTHESIS_PROFILE=thorough``) scales every property up. ``CASES`` counts the cases
actually run; each test checks its property ran, and the terminal summary prints the total (conftest.py).
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import math
import re
import struct
from collections import Counter

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qlora_ref.cli import main
from qlora_ref.model.loading import CheckpointError, read_safetensors_index

#: cases run per property (read by conftest.py's terminal summary and docs/reliability.md)
CASES: Counter = Counter()


def counted(name):
    def deco(f):
        @functools.wraps(f)
        def inner(*args, **kwargs):
            CASES[name] += 1
            return f(*args, **kwargs)

        return inner

    return deco


def scaled(k: int):
    """k times the profile's example count (ci: 60), without per-example deadline."""
    return settings(max_examples=k * settings.default.max_examples, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                           HealthCheck.filter_too_much])


def run_property(name, prop, *args):
    before = CASES[name]
    prop(*args)
    ran = CASES[name] - before
    assert ran >= settings.default.max_examples, f"{name}: only {ran} cases ran"


json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                         st.text(max_size=12))


def json_values(keys=None):
    keys = st.text(max_size=8) if keys is None else keys
    return st.recursive(json_scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                              st.dictionaries(keys, inner, max_size=4)), max_leaves=12)


# ---------------------------------------------------------------------------------------------- safetensors
DTYPE_SIZES = {"F32": 4, "F16": 2, "BF16": 2, "I64": 8, "U8": 1, "F64": 8, "I8": 1, "BOOL": 1}


@st.composite
def safetensors_files(draw):
    """A valid file of 1-4 tensors, then 0-3 mutations of its header, length field or bytes. Returns (bytes,
    the header as written or None when it is not JSON we wrote)."""
    n = draw(st.integers(1, 4))
    header, offset = {}, 0
    for i in range(n):
        dtype = draw(st.sampled_from(sorted(DTYPE_SIZES)))
        shape = draw(st.lists(st.integers(0, 5), min_size=0, max_size=3))
        size = math.prod(shape) * DTYPE_SIZES[dtype]
        header[f"t{i}"] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    if draw(st.booleans()):
        header["__metadata__"] = {"format": "pt"}
    data = bytes(draw(st.binary(min_size=offset, max_size=offset)))
    length = None
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["offsets", "shape", "dtype", "drop_key", "entry", "header", "length",
                                     "truncate", "metadata", "extra_data"]))
        name = draw(st.sampled_from(sorted(k for k in header if k != "__metadata__") or ["t0"])) \
            if isinstance(header, dict) else "t0"
        entry = header.get(name) if isinstance(header, dict) else None
        if kind == "offsets" and isinstance(entry, dict):
            entry["data_offsets"] = draw(st.one_of(st.lists(st.integers(-10, offset + 10), min_size=0, max_size=3),
                                                   json_values()))
        elif kind == "shape" and isinstance(entry, dict):
            entry["shape"] = draw(st.one_of(st.lists(st.integers(-3, 2**40), max_size=3), json_values()))
        elif kind == "dtype" and isinstance(entry, dict):
            entry["dtype"] = draw(st.one_of(st.sampled_from(sorted(DTYPE_SIZES) + ["F8", "f32", ""]), json_values()))
        elif kind == "drop_key" and isinstance(entry, dict) and entry:
            entry.pop(draw(st.sampled_from(sorted(entry))))
        elif kind == "entry" and isinstance(header, dict):
            header[name] = draw(json_values())
        elif kind == "header":
            header = draw(json_values())
        elif kind == "metadata" and isinstance(header, dict):
            header["__metadata__"] = draw(json_values())
        elif kind == "length":
            length = draw(st.one_of(st.integers(0, 2**64 - 1), st.integers(0, 400)))
        elif kind == "truncate":
            data = data[: draw(st.integers(0, len(data)))]
        elif kind == "extra_data":
            data += draw(st.binary(max_size=16))
    h = json.dumps(header).encode()
    raw = struct.pack("<Q", len(h) if length is None else length) + h + data
    if draw(st.booleans()) and draw(st.booleans()):  # and sometimes a cut anywhere, header included
        raw = raw[: draw(st.integers(0, len(raw)))]
    return raw, header


@scaled(6)
@given(case=safetensors_files())
@counted("safetensors headers")
def _safetensors_property(folder, case):
    raw, header = case
    path = folder / "fuzz.safetensors"
    path.write_bytes(raw)
    try:
        refs = read_safetensors_index(path)
    except CheckpointError as e:
        assert str(e).startswith(f"{path}: "), e  # the file is named first
        return
    # accepted: then the header was an object, every tensor lies inside the data, matches its shape and dtype,
    # and none overlaps another — checked here from the raw bytes, independently of the reader
    (n,) = struct.unpack("<Q", raw[:8])
    assert isinstance(header, dict) and n == len(raw) - 8 - len(raw[8 + n:])
    data = raw[8 + n:]
    spans = []
    for name, ref in refs.items():
        info = header[name]
        start, end = info["data_offsets"]
        assert 0 <= start <= end <= len(data) and ref.shape == tuple(info["shape"])
        assert end - start == math.prod(info["shape"]) * DTYPE_SIZES[info["dtype"]]
        array = np.asarray(ref.load())
        assert array.shape == ref.shape and array.tobytes() == data[start:end]
        if end > start:
            spans.append((start, end))
    spans.sort()
    assert all(b[0] >= a[1] for a, b in zip(spans, spans[1:], strict=False))


def test_fuzz_safetensors_headers(tmp_path):
    run_property("safetensors headers", _safetensors_property, tmp_path)


# ---------------------------------------------------------------------------------------------- JSONL records
RECORD_KEYS = st.sampled_from(["instruction", "input", "output", "messages", "conversations", "text", "role",
                               "content", "from", "value", "system"])
ROLE_NAMES = st.sampled_from(["user", "assistant", "system", "human", "gpt", "prompter", "bot", "robot", ""])


@st.composite
def records(draw):
    kind = draw(st.sampled_from(["alpaca", "pair", "messages", "sharegpt", "guanaco", "any", "line"]))
    text = st.one_of(st.text(max_size=20), json_scalars)
    if kind == "alpaca":
        r = {"instruction": draw(text), "output": draw(text)}
        if draw(st.booleans()):
            r["input"] = draw(text)
    elif kind == "pair":
        r = {"input": draw(text), "output": draw(text)}
    elif kind in ("messages", "sharegpt"):
        rk, ck = ("role", "content") if kind == "messages" else ("from", "value")
        turns = draw(st.lists(st.one_of(st.fixed_dictionaries({rk: ROLE_NAMES, ck: text}), json_values(RECORD_KEYS)),
                              max_size=5))
        r = {"messages" if kind == "messages" else "conversations": turns}
    elif kind == "guanaco":
        parts = draw(st.lists(st.tuples(st.sampled_from(["### Human:", "### Assistant:", "##"]),
                                        st.text(max_size=10)), max_size=4))
        r = {"text": "".join(a + b for a, b in parts)}
    elif kind == "any":
        r = draw(json_values(RECORD_KEYS))
    else:
        return draw(st.text(max_size=30).filter(lambda s: "\n" not in s and "\r" not in s))
    return json.dumps(r)


@scaled(5)
@given(lines=st.lists(records(), min_size=1, max_size=4))
@counted("JSONL records")
def _jsonl_property(folder, lines):
    from qlora_ref.data import CHATML_TEMPLATE, ByteTokenizer, MalformedRecordError, build_dataset, read_jsonl

    path = folder / "fuzz.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    try:
        examples = read_jsonl(path)
    except MalformedRecordError as e:
        lineno = int(str(e).removeprefix(f"{path}:").split(":", 1)[0])  # "file:line: ..."
        assert 1 <= lineno <= len(lines)
        return
    for ex in examples:  # the normalized form the pipeline relies on
        roles = [m["role"] for m in ex.messages]
        assert all(isinstance(m["content"], str) for m in ex.messages)
        body = [r for r in roles if r != "system"]
        assert roles[: len(roles) - len(body)] == ["system"] * (len(roles) - len(body))
        assert body and body == ["user", "assistant"] * (len(body) // 2) and body[-1] == "assistant"
    for template in (None, CHATML_TEMPLATE):
        ds = build_dataset(examples, ByteTokenizer(template), max_length=4096, warn=False)
        assert len(ds) + ds.report.n_dropped == len(examples)
        assert all(len(i) == len(lab) for i, lab in zip(ds.input_ids, ds.labels, strict=True))


def test_fuzz_jsonl_records(tmp_path):
    run_property("JSONL records", _jsonl_property, tmp_path)


def _outcome(read, path):
    """(messages of every example, None) or (None, the error's message after its "file:line: ")."""
    from qlora_ref.data import MalformedRecordError

    try:
        return [ex.messages for ex in read(path)], None
    except MalformedRecordError as e:
        return None, str(e).removeprefix(f"{path}:").split(": ", 1)[1]


@scaled(5)
@given(lines=st.lists(records(), min_size=1, max_size=4), indent=st.sampled_from([None, 0, 2, 4]))
@counted("JSON arrays")
def _json_array_property(folder, lines, indent):
    """The records of a .jsonl file written as one .json array (any indent) read the same: the same examples, or
    the same error for the same record."""
    from qlora_ref.data import read_json, read_jsonl

    try:
        values = [json.loads(line) for line in lines]
    except json.JSONDecodeError:
        CASES["JSON arrays skipped"] += 1
        return  # not a record a .json array can hold: the .jsonl property covers broken lines
    (folder / "fuzz.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (folder / "fuzz.json").write_text(json.dumps(values, indent=indent), encoding="utf-8")
    assert _outcome(read_json, folder / "fuzz.json") == _outcome(read_jsonl, folder / "fuzz.jsonl")


def test_fuzz_json_arrays(tmp_path):
    run_property("JSON arrays", _json_array_property, tmp_path)


# ---------------------------------------------------------------------------------------------- adapters
ADAPTER_KEYS = st.sampled_from(["r", "lora_alpha", "lora_dropout", "target_modules", "peft_type", "use_dora",
                                "use_rslora", "bias", "fan_in_fan_out", "rank_pattern", "alpha_pattern",
                                "modules_to_save", "layer_replication", "lora_bias"])


@st.composite
def adapter_cases(draw):
    """(adapter_config as JSON text, {file key: array}) from a valid r=4 adapter with 0-3 mutations."""
    from qlora_ref.adapters import PEFT_PREFIX, peft_adapter_config
    from qlora_ref.model.config import LoraConfig

    cfg = peft_adapter_config(LoraConfig(r=4, alpha=8.0, target_modules=("q_proj", "v_proj")))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    weights = {}
    for layer in ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"):
        weights[f"{PEFT_PREFIX}{layer}.lora_A.weight"] = rng.standard_normal((4, 64)).astype(np.float32)
        weights[f"{PEFT_PREFIX}{layer}.lora_B.weight"] = rng.standard_normal((64, 4)).astype(np.float32)
    text = None
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["value", "drop", "whole", "rename", "shape", "nonfinite", "dtype", "text"]))
        key = draw(st.sampled_from(sorted(weights))) if weights else None
        if kind == "value" and isinstance(cfg, dict):
            cfg[draw(ADAPTER_KEYS)] = draw(json_values())
        elif kind == "drop" and isinstance(cfg, dict) and cfg:
            cfg.pop(draw(st.sampled_from(sorted(cfg))))
        elif kind == "whole":
            cfg = draw(json_values(ADAPTER_KEYS))
        elif kind == "rename" and key:
            weights[draw(st.sampled_from(["x", key.replace("q_proj", "lm_head"), key.replace(".weight", ""),
                                          key.replace("lora_A", "lora_B"), "base_model.model.a.lora_A.weight"]))] = \
                weights.pop(key)
        elif kind == "shape" and key:
            weights[key] = rng.standard_normal(draw(st.lists(st.integers(1, 6), min_size=1, max_size=3))).astype(
                np.float32)
        elif kind == "nonfinite" and key and weights[key].dtype.kind == "f":
            weights[key].flat[draw(st.integers(0, weights[key].size - 1))] = draw(st.sampled_from(
                [np.nan, np.inf, -np.inf]))
        elif kind == "dtype" and key:
            weights[key] = weights[key].astype(draw(st.sampled_from([np.float16, np.float64, np.int32, np.uint8])))
        elif kind == "text":
            text = draw(st.text(max_size=20))
    return (json.dumps(cfg) if text is None else text), weights


@scaled(4)
@given(case=adapter_cases())
@counted("adapter folders")
def _adapter_property(folder, case):
    from safetensors.numpy import save_file

    from qlora_ref.adapters import read_adapter_lora_config

    text, weights = case
    (folder / "adapter_config.json").write_text(text)
    save_file(weights, str(folder / "adapter_model.safetensors"))
    try:
        lora = read_adapter_lora_config(folder)
    except ValueError as e:
        assert str(folder) in str(e), e  # the folder or one of its files is named
        return
    assert isinstance(lora.r, int) and lora.r > 0 and math.isfinite(lora.alpha) and lora.alpha > 0
    assert 0.0 <= lora.dropout < 1.0 and set(lora.target_modules) <= {"q_proj", "v_proj"}
    assert all(np.isfinite(w).all() for w in weights.values())  # a non-finite adapter is never accepted


def test_fuzz_adapter_folders(tmp_path):
    run_property("adapter folders", _adapter_property, tmp_path)


# ---------------------------------------------------------------------------------------------- configs
CONFIG_FIELDS = ["lora_r", "lora_alpha", "lora_dropout", "learning_rate", "micro_batch_size", "max_steps",
                 "max_grad_norm", "warmup_ratio", "eval_fraction", "blocksize", "quant_type", "optimizer", "seed",
                 "max_length", "keep_checkpoints", "target_modules", "adam_beta2", "lr_scheduler", "compute_dtype"]


@scaled(4)
@given(cfg=st.one_of(st.dictionaries(st.sampled_from(CONFIG_FIELDS + ["lora_rank"]), json_values(), max_size=4),
                     json_values()))
@counted("training configs")
def _config_property(folder, cfg):
    from qlora_ref.train.config import TrainConfig

    path = folder / "config.json"
    path.write_text(json.dumps(cfg))
    try:
        config = TrainConfig.from_json(path)
    except ValueError as e:
        assert str(e).startswith(f"{path}: "), e
        return
    assert config.to_dict() == TrainConfig.from_dict(config.to_dict()).to_dict()  # a valid config round-trips
    assert config.lora_r >= 0 and config.learning_rate > 0 and math.isfinite(config.lora_alpha)


def test_fuzz_training_configs(tmp_path):
    run_property("training configs", _config_property, tmp_path)


# ---------------------------------------------------------------------------------------------- CLI values
def cli(argv) -> tuple[int, str]:
    """``qlora argv`` -> (exit code, stderr); argparse's own rejections (SystemExit 2) count as exit code 2, and
    "accepted" when the command got as far as loading a model (patched to raise ``_Accepted``)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = main(argv)
        except SystemExit as e:
            rc = e.code
        except _Accepted:
            rc = "accepted"
    return rc, err.getvalue()


numbers = st.one_of(st.integers(-5, 10**6), st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(
    ["", "x", "1e400", "-0", "0x10", "nan", "1_000"]))


class _Accepted(Exception):
    """Raised where a model would be loaded: the arguments were accepted."""


@scaled(4)
@given(max_new=numbers, temperature=numbers, top_p=numbers, prompt=st.text(max_size=6),
       seed=st.one_of(numbers, st.sampled_from([2**64 - 1, 2**64, -(2**63), 10**30])))
@counted("generate arguments")
def _generate_property(max_new, temperature, top_p, prompt, seed):
    rc, err = cli(["generate", "--model", "m", "--prompt", prompt, "--max-new-tokens", str(max_new),
                   "--temperature", str(temperature), "--top-p", str(top_p), "--seed", str(seed)])

    def value(s, kind):
        try:
            return kind(str(s))
        except ValueError:
            return None

    n, t, p, s = value(max_new, int), value(temperature, float), value(top_p, float), value(seed, int)
    valid = (n is not None and n >= 1 and t is not None and math.isfinite(t) and (t == 0 or t >= 1e-4)
             and p is not None
             and 0 < p <= 1 and prompt.strip() != "" and s is not None and 0 <= s < 2**64)
    if valid:
        assert rc == "accepted", err  # reached the model load
    else:  # named by the option typed (argparse's own rejections name it too), never by the library's argument
        assert rc == 2 and any(k in err for k in ("--max-new-tokens", "--temperature", "--top-p", "--seed",
                                                  "--prompt")), err
        assert not re.search(r"(?<![-\w])(max_new_tokens|temperature|top_p|seed) must", err), err


def test_fuzz_generate_arguments(monkeypatch):
    import qlora_ref.model.loading
    import qlora_ref.train.api

    def accepted(*a, **k):
        raise _Accepted

    monkeypatch.setattr(qlora_ref.model.loading, "load_model", accepted)
    monkeypatch.setattr(qlora_ref.train.api, "load_tokenizer", accepted)  # read first, before the model
    run_property("generate arguments", _generate_property)


MERGE_QUANT = ["trained", "none", "nf4", "fp4", "int4", "fp4_e3m0"]


@scaled(2)
@given(dtype=st.sampled_from(["bfloat16", "float16", "float32", "bf16", "fp8", ""]),
       quant=st.sampled_from([*MERGE_QUANT, "nf3", "NF4", ""]), model=st.sampled_from(["given", "missing", "default"]),
       out=st.sampled_from(["new", "non-empty", "a file", "the adapter"]),
       train_config=st.sampled_from(["ours", "absent", "not JSON", "unknown field", "bad value"]))
@counted("merge arguments")
def _merge_property(root, dtype, quant, model, out, train_config):
    adapter = root / "adapter"
    tc = adapter / "train_config.json"
    tc.unlink(missing_ok=True)
    if train_config != "absent":
        tc.write_text({"ours": json.dumps({"quant_type": "fp4", "blocksize": 128}), "not JSON": "{",
                       "unknown field": json.dumps({"lora_rank": 8}),
                       "bad value": json.dumps({"blocksize": 3})}[train_config])
    target = {"new": root / "out" / str(CASES["merge arguments"]), "non-empty": root / "full",
              "a file": root / "afile", "the adapter": adapter}[out]
    argv = ["merge", "--adapter", str(adapter), "--output-dir", str(target), "--dtype", dtype, "--quant-type", quant]
    if model != "default":
        argv += ["--model", str(root / ("model" if model == "given" else "missing"))]
    rc, err = cli(argv)
    config_ok = train_config in ("ours", "absent") or quant != "trained"
    valid = (dtype in ("bfloat16", "float16", "float32") and quant in MERGE_QUANT and model != "missing"
             and out == "new" and config_ok)
    if valid:
        assert rc == "accepted", err  # reached the model load
        return
    assert rc == 2, err
    named = {"--quant-type" if quant not in MERGE_QUANT else None, "dtype" if dtype not in ("bfloat16", "float16",
             "float32") else None, "(--model)" if model == "missing" else None,
             None if config_ok else f"{tc}: ", {"non-empty": "not empty", "a file": "is not a folder",
                                                 "the adapter": "must differ", "new": None}[out]} - {None}
    assert any(k in err for k in named), (named, err)


def test_fuzz_merge_arguments(tmp_path, monkeypatch):
    """Every ``qlora merge`` argument, the adapter's train_config.json included, is checked before the model is
    loaded; a bad one ends the command with one line naming it."""
    from test_train import write_tiny_model

    import qlora_ref
    from qlora_ref.adapters import save_adapter
    from qlora_ref.model import LoraConfig, load_model

    write_tiny_model(tmp_path / "model")
    save_adapter(load_model(tmp_path / "model", lora=LoraConfig(r=2)), tmp_path / "adapter",
                 base_model_name_or_path=str(tmp_path / "model"))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    (tmp_path / "afile").write_text("")

    def accepted(*a, **k):
        raise _Accepted

    monkeypatch.setattr(qlora_ref, "load_model", accepted)
    run_property("merge arguments", _merge_property, tmp_path)


MEMORY_OPTIONS = {"--batch": numbers, "--seq": numbers, "--r": numbers, "--blocksize": numbers,
                  "--lora-dropout": numbers, "--targets": st.sampled_from(["all", "attention", "q_proj,v_proj",
                                                                           "q_proj,,", "lm_head", ""]),
                  "--method": st.sampled_from(["qlora", "lora", "full", "qlora2"]),
                  "--model": st.sampled_from(["7b", "llama-65b", "13B", "gpt-2"])}


@scaled(3)
@given(options=st.dictionaries(st.sampled_from(sorted(MEMORY_OPTIONS)), st.just(None), min_size=1, max_size=4)
       .flatmap(lambda d: st.fixed_dictionaries({k: MEMORY_OPTIONS[k] for k in d})))
@counted("memory arguments")
def _memory_property(options):
    argv = ["memory", "--json"]
    for k, v in options.items():
        argv += [f"{k}={v}"]
    rc, err = cli(argv)
    assert rc in (0, 2), (rc, err)
    if rc == 2:  # the option is named as typed, not the calculator's parameter
        assert any(k in err for k in options) or "--targets" in err or "--model" in err, (options, err)


def test_fuzz_memory_arguments():
    run_property("memory arguments", _memory_property)


TRAIN_FLAGS = {"--lora-r": "lora_r", "--lora-alpha": "lora_alpha", "--lora-dropout": "lora_dropout", "--lr":
               "learning_rate", "--batch-size": "micro_batch_size", "--grad-accum": "gradient_accumulation_steps",
               "--max-grad-norm": "max_grad_norm", "--warmup-ratio": "warmup_ratio", "--max-length": "max_length",
               "--eval-fraction": "eval_fraction", "--blocksize": "blocksize", "--max-steps": "max_steps",
               "--save-every": "save_every", "--seed": "seed"}


@scaled(3)
@given(flags=st.dictionaries(st.sampled_from(sorted(TRAIN_FLAGS)), numbers, min_size=1, max_size=3))
@counted("finetune options")
def _finetune_options_property(flags):
    from qlora_ref.cli import build_parser
    from qlora_ref.cli.finetune import TRAIN_OPTIONS, _config_from_args

    argv = ["finetune", "--model", "m", "--data", "d.jsonl", "--output-dir", "o"]
    for k, v in flags.items():
        argv.append(f"{k}={v}")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as e:
            assert e.code == 2 and any(k in err.getvalue() for k in flags), err.getvalue()
            return
    try:
        config = _config_from_args(args)
    except ValueError as e:
        assert any(k in str(e) for k in flags) or "LoRA settings" in str(e), e  # the option given is named
        return
    for k, v in flags.items():  # accepted values arrive unchanged
        field = TRAIN_FLAGS[k]
        assert getattr(config, field) == TRAIN_OPTIONS.get(field, ("", int))[1](str(v)), k


def test_fuzz_finetune_options():
    run_property("finetune options", _finetune_options_property)


def test_case_counter_counts():
    """The counter itself: a property run adds exactly the examples Hypothesis executed."""
    calls = []

    @settings(max_examples=7, derandomize=True, database=None)
    @given(st.integers())
    @counted("counter self-test")
    def prop(x):
        calls.append(x)

    before = CASES["counter self-test"]
    prop()
    assert CASES["counter self-test"] - before == len(calls) >= 1
