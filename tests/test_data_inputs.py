"""What users' data and model folders bring that the formats do not foresee: special tokens kept in
special_tokens_map.json, keys a format does not read (misspelt or metadata), non-string inputs, files that are not
UTF-8, folders with other files, a local folder named like the shipped corpus, examples longer than the model's
context, and the CLI's held-out options. Each is an error naming where, or counted and reported: never silent."""

from __future__ import annotations

import json
import re
import types
import warnings
from pathlib import Path

import numpy as np
import pytest

from qlora_ref.data import (
    IGNORE_INDEX,
    ByteTokenizer,
    DataReport,
    MalformedRecordError,
    build_dataset,
    load_examples,
    read_chatterbot_yaml,
    read_json,
    read_jsonl,
    read_parquet,
    record_to_example,
    tokenize_example,
)
from qlora_ref.train.config import TrainConfig


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


TOK = ByteTokenizer()


def _response(tok, ids, labels) -> str:
    return tok.decode([i for i, lab in zip(ids, labels, strict=True) if lab != IGNORE_INDEX])


def _user_warnings(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, UserWarning)]


class _NoEos(ByteTokenizer):
    """A template-less tokenizer without EOS (as a folder whose special tokens were not found)."""

    eos_token_id = None


# ------------------------------------------------------------------------------------------------ special tokens
def _folder_with_special_tokens_map(folder):
    """A byte-level tokenizer.json, special tokens only in special_tokens_map.json, no chat template (a base model
    saved by older transformers)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE({c: i for i, c in enumerate(alphabet)}, []))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<pad>", "<s>", "</s>"])
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    (folder / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": {"content": "</s>", "lstrip": False}, "pad_token": "<pad>"}))
    return folder


def test_special_tokens_come_from_special_tokens_map_when_the_config_lacks_them(tmp_path):
    from qlora_ref.model.tokenizer import Tokenizer

    tok = Tokenizer.from_folder(_folder_with_special_tokens_map(tmp_path / "model"))
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (257, 258, 256)  # as AutoTokenizer reads them
    ids, labels = tokenize_example(record_to_example({"instruction": "Name a colour.", "output": "Blue."}, "x:1"), tok)
    assert ids[0] == 257 and labels[-1] == 258  # the response ends with EOS: the model learns to stop
    assert tok.decode([t for t in labels if t != IGNORE_INDEX]) == "Blue.</s>"


@pytest.mark.parametrize("decoder", [False, True], ids=["legacy_config", "added_tokens_decoder"])
def test_special_tokens_named_twice_are_read_as_auto_tokenizer_reads_them(tmp_path, decoder):
    """tokenizer_config.json and special_tokens_map.json disagreeing on EOS (the token the template-less format
    trains responses to end with): the one transformers' AutoTokenizer takes, the oracle here."""
    import transformers

    from qlora_ref.model.tokenizer import Tokenizer

    folder = _folder_with_special_tokens_map(tmp_path / "model")
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<pad>", "bos_token": "</s>"}
    if decoder:
        config["added_tokens_decoder"] = {
            str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                     "special": True} for i, t in ((256, "<pad>"), (257, "<s>"), (258, "</s>"))}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    theirs = transformers.AutoTokenizer.from_pretrained(str(folder))
    ours = Tokenizer.from_folder(folder)
    assert (ours.eos_token, ours.bos_token) == (theirs.eos_token, theirs.bos_token)
    assert ours.eos_token_id == theirs.eos_token_id


def test_lines_of_unicode_spaces_are_blank(tmp_path):
    """Read as bytes, a line of no-break spaces was no longer blank (invalid JSON); text mode had skipped it."""
    path = tmp_path / "d.jsonl"
    path.write_text('{"input": "q", "output": "a"}\n\u00a0\n\u3000 \n', encoding="utf-8")
    assert len(read_jsonl(path)) == 1


def test_a_broken_tokenizer_file_is_named(tmp_path):
    from qlora_ref.model.tokenizer import Tokenizer

    folder = _folder_with_special_tokens_map(tmp_path / "model")
    (folder / "special_tokens_map.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"special_tokens_map\.json: not valid JSON"):
        Tokenizer.from_folder(folder)


def test_no_eos_without_a_template_is_warned_once(tmp_path):
    from qlora_ref.train.api import prepare_data

    ex = record_to_example({"instruction": "q", "output": "a"}, "x:1")
    with pytest.warns(UserWarning, match="no end-of-sequence token.*will not learn to stop"):
        build_dataset([ex], _NoEos(), max_length=1000)
    with warnings.catch_warnings():  # a tokenizer with EOS (or a chat template) says nothing
        warnings.simplefilter("error")
        build_dataset([ex], ByteTokenizer(), max_length=1000)
    data = _write_jsonl(tmp_path / "d.jsonl", [{"instruction": f"q{i}", "output": "a"} for i in range(20)])
    with warnings.catch_warnings(record=True) as w:  # the training and the held-out part: one warning
        warnings.simplefilter("always")
        prepare_data(str(data), _NoEos(), TrainConfig(eval_fraction=0.2))
    assert sum("will not learn to stop" in m for m in _user_warnings(w)) == 1


# ------------------------------------------------------------------------------------------------ keys
def test_a_misspelt_key_is_an_error_naming_it_and_the_key_meant(tmp_path):
    path = _write_jsonl(tmp_path / "typo.jsonl", [{"instruction": "Translate", "output": "fromage"},
                                                  {"instruction": "Translate", "inptu": "cheese", "output": "fromage"}])
    with pytest.raises(MalformedRecordError, match=r"typo.jsonl:2: unknown key 'inptu': did you mean 'input'\?"):
        read_jsonl(path)
    report = DataReport()
    assert len(read_jsonl(path, report, on_malformed="drop")) == 1 and report.dropped["malformed record"] == 1
    for record, meant in [({"Instruction": "x", "output": "y"}, "instruction"),  # case, a swap, one letter more
                          ({"instruction": "x", "ouptut": "y", "output": "z"}, None),
                          ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                            "txet": "x"}, None),
                          ({"instructions": "x", "input": "i", "output": "y"}, "instruction"),
                          ({"text": "### Human: q### Assistant: a", "conversation_id": "7"}, None),  # metadata
                          ({"instruction": "x", "output": "y", "conversation_id": "7"}, None),
                          # "prompt" alone would not make it prompt-completion: "prompts" is only ignored...
                          ({"text": "### Human: q### Assistant: a", "prompts": "x"}, None),
                          # ...but beside a "completion" it would have
                          ({"text": "### Human: q### Assistant: a", "promt": "x", "completion": "y"}, "prompt"),
                          ({"text": "### Human: q### Assistant: a", "inptu": "x", "output": "y"}, "input")]:
        if meant is None:  # a near miss of a key the record has (or a far one) is only ignored
            record_to_example(record, "x:1")
            continue
        with pytest.raises(MalformedRecordError, match=f"did you mean '{meant}'"):
            record_to_example(record, "x:1")


def test_keys_a_format_does_not_read_are_counted_and_named(tmp_path):
    from qlora_ref.train.api import prepare_data

    messages = [{"role": "user", "content": "A"}, {"role": "assistant", "content": "B"}]
    path = _write_jsonl(tmp_path / "d.jsonl", [
        {"id": 1, "instruction": "Say hi", "output": "hi"},
        {"instruction": "Say hi", "output": "hi", "system": "Be brief.", "id": 2},
        {"messages": messages, "instruction": "dropped", "output": "dropped"},
    ])
    report = DataReport()
    examples = read_jsonl(path, report)
    assert len(examples) == 3 and examples[2].messages == messages
    assert report.ignored == {"id": 2, "system": 1, "instruction": 1, "output": 1}
    summary = report.summary()
    assert f"ignored key 'system' in 1 record (e.g. {path}:2)" in summary
    assert f"ignored key 'id' in 2 records (e.g. {path}:1, {path}:2)" in summary
    assert report.n_dropped == 0 and report.records == report.kept  # nothing dropped: the keys only
    # a fine-tune says so (qlora finetune prints the same summary)
    with pytest.warns(UserWarning, match=r"ignored key 'system' in 1 record"):
        prepare_data(str(path), ByteTokenizer(), TrainConfig(eval_fraction=0.0))


@pytest.mark.parametrize("value", [0, [], False, {}, 5])
def test_a_non_string_input_is_refused_whatever_its_truth(value):
    with pytest.raises(MalformedRecordError, match="x:1: 'input' must be a string"):
        record_to_example({"instruction": "Add one to", "input": value, "output": "1"}, "x:1")


@pytest.mark.parametrize("record", [{"instruction": "i", "output": "o"}, {"instruction": "i", "input": None,
                                                                       "output": "o"},
                                    {"instruction": "i", "input": "", "output": "o"}])
def test_a_missing_null_or_empty_input_is_no_input(record):
    assert record_to_example(record, "x:1").alpaca == ("i", "")


# ------------------------------------------------------------------------------------------------ encodings
def test_a_file_that_is_not_utf8_names_file_and_line_and_can_be_skipped(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"instruction": "ok", "output": "fine"}\n'
                     + '{"instruction": "caf\u00e9", "output": "yes"}\n'.encode("latin-1"))
    with pytest.raises(MalformedRecordError, match=r"latin1.jsonl:2: not UTF-8 text \(byte 0xe9"):
        read_jsonl(path)
    report = DataReport()
    assert [e.source for e in read_jsonl(path, report, on_malformed="drop")] == [f"{path}:1"]
    assert report.dropped["malformed record"] == 1 and f"{path}:2" in report.summary()

    yml = tmp_path / "latin1.yml"
    yml.write_bytes("conversations:\n- - Hello\n  - Caf\u00e9\n".encode("latin-1"))
    with pytest.raises(MalformedRecordError, match=r"latin1.yml:3: not UTF-8 text"):
        read_chatterbot_yaml(yml)


def test_a_utf8_bom_and_windows_line_ends_are_read(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b'{"instruction": "a", "output": "b"}\r\n\r\n{"input": "c", "output": "d"}\r\n')
    assert [e.source for e in read_jsonl(path)] == [f"{path}:1", f"{path}:3"]


# ------------------------------------------------------------------------------------------------ folders, specs
def test_a_folder_reads_any_case_of_the_suffix_and_counts_what_it_skips(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    _write_jsonl(folder / "a.jsonl", [{"instruction": "a", "output": "b"}])
    _write_jsonl(folder / "B.JSONL", [{"instruction": "c", "output": "d"}])
    (folder / "c.json").write_text(json.dumps([{"instruction": "e", "output": "f"}]))
    (folder / "notes.txt").write_text("not data")
    (folder / "sub").mkdir()
    _write_jsonl(folder / "sub" / "x.jsonl", [{"instruction": "g", "output": "h"}])
    report = DataReport()
    examples = load_examples(folder, report)
    assert [e.source for e in examples] == [f"{folder / 'B.JSONL'}:1", f"{folder / 'a.jsonl'}:1",
                                            f"{folder / 'c.json'}:1"]
    assert report.skipped == {"not a .jsonl/.json/.parquet/.yml/.yaml file": 1, "a sub-folder, not read": 1}
    assert str(folder / "notes.txt") in report.summary() and str(folder / "sub") in report.summary()
    assert len(load_examples(folder / "B.JSONL")) == 1


def test_a_local_path_named_like_the_corpus_is_refused_not_shadowed(tmp_path, monkeypatch):
    from qlora_ref.train.api import check_data_spec

    monkeypatch.chdir(tmp_path)
    (tmp_path / "chatterbot").mkdir()
    _write_jsonl(tmp_path / "chatterbot" / "mine.jsonl", [{"instruction": "a", "output": "b"}])
    for read in (load_examples, check_data_spec):
        with pytest.raises(ValueError, match=r"write \./chatterbot for the folder, or chatterbot:english for the "
                                             "corpus"):
            read("chatterbot")
    assert len(load_examples("./chatterbot")) == 1
    check_data_spec("./chatterbot")
    # a file whose name only starts with "chatterbot" is a file, checked as one
    with pytest.raises(ValueError, match="chatterbot_train.jsonl: data file does not exist"):
        check_data_spec("chatterbot_train.jsonl")


# ------------------------------------------------------------------------------------------------ context
def test_examples_longer_than_the_models_context_are_warned_about(tmp_path, monkeypatch):
    from qlora_ref.train import api

    data = _write_jsonl(tmp_path / "d.jsonl", [{"instruction": f"what is {i} plus 1", "output": "x" * 80}
                                               for i in range(10)])
    model = types.SimpleNamespace(config=types.SimpleNamespace(max_position_embeddings=64))
    trainer = types.SimpleNamespace(model=model)
    monkeypatch.setattr(api, "train", lambda *a, **k: None)  # the data step only
    config = TrainConfig(eval_fraction=0.0, progress=False, max_length=512)
    with pytest.warns(UserWarning, match=r"max_length=512 is more than the model's context of 64 tokens "
                                         r"\(max_position_embeddings\): 10 examples are longer"):
        api.finetune("model", str(data), config, trainer=(trainer, ByteTokenizer()))
    with warnings.catch_warnings():  # examples within the context, or a max_length that drops the longer ones
        warnings.simplefilter("error")
        api.warn_beyond_context(trainer, config, build_dataset(read_jsonl(data)[:1], ByteTokenizer(), 60, warn=False))
        api.warn_beyond_context(trainer, config.replace(max_length=64),
                                build_dataset(read_jsonl(data), ByteTokenizer(), 512, warn=False))
    assert np.all(build_dataset(read_jsonl(data), ByteTokenizer(), 512, warn=False).lengths > 64)


# ------------------------------------------------------------------------------------------------ CLI
def test_eval_fraction_beside_eval_data_is_refused_naming_both(tmp_path, capsys):
    from qlora_ref.cli import main

    data = _write_jsonl(tmp_path / "t.jsonl", [{"instruction": "a", "output": "b"}])
    rc = main(["finetune", "--model", str(tmp_path / "model"), "--data", str(data), "--eval-data", str(data),
               "--eval-fraction", "0.3", "--output-dir", str(tmp_path / "out"), "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "qlora finetune: error: --eval-fraction 0.3 and --eval-data" in err and "give one of them" in err
    assert not (tmp_path / "out").exists()  # refused before anything is made


# --------------------------------------------------------------------------------------------- .json arrays
ALPACA = [{"instruction": "Name a colour.", "input": "", "output": "Blue."},
          {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
          {"instruction": "Say hi.", "input": "", "output": "Hi."}]


def test_a_json_array_reads_as_its_lines_would(tmp_path):
    """Alpaca's alpaca_data.json is one JSON array (indented by 4): it reads as the same records one a line in a
    .jsonl file, each named by the line its record starts on; a .json file of one record a line reads too (as
    datasets' json loader reads both); an empty array is no record."""
    array = tmp_path / "alpaca_data.json"
    array.write_text(json.dumps(ALPACA, indent=4), encoding="utf-8")
    lines = _write_jsonl(tmp_path / "alpaca.jsonl", ALPACA)
    report = DataReport()
    from_array, from_lines = read_json(array, report), read_jsonl(lines)
    assert [e.messages for e in from_array] == [e.messages for e in from_lines]
    starts = [i + 1 for i, line in enumerate(array.read_text().splitlines()) if line.strip() == "{"]
    assert [e.source for e in from_array] == [f"{array}:{n}" for n in starts] and len(starts) == 3
    assert (report.records, report.kept) == (3, 3)
    assert [e.messages for e in load_examples(_write_jsonl(tmp_path / "lines.json", ALPACA))] == \
        [e.messages for e in from_lines]
    (tmp_path / "empty.json").write_text(" [ ]\n")
    assert read_json(tmp_path / "empty.json") == []


@pytest.mark.parametrize("body, line, message", [
    ('[{"instruction": "a", "output": "b"}\n {"instruction": "c", "output": "d"}]', 2, "expected ',' or ']'"),
    ('[{"instruction": "a", "output": "b"},\n {"instruction": "c", "output": ', 2, "Expecting value"),
    ('[{"instruction": "a", "output": "b"}', 1, "the array is not closed"),
    ('[{"instruction": "a", "output": "b"}]\n[]', 2, "extra data after the array"),
    ('{\n  "instruction": "a",\n  "output": "b"\n}', 1, "one JSON object spread over lines"),
])
def test_broken_json_array_syntax_is_an_error_naming_the_line_even_when_dropping(tmp_path, body, line, message):
    """Broken syntax cannot be skipped record by record (nothing after it can be read), so --skip-malformed does
    not hide it."""
    path = tmp_path / "data.json"
    path.write_text(body)
    for on_malformed in ("error", "drop"):
        with pytest.raises(MalformedRecordError, match=f"^{path}:{line}: .*{message}"):
            read_json(path, on_malformed=on_malformed)


def test_a_json_array_record_of_the_wrong_form_is_dropped_and_counted_on_request(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([ALPACA[0], {"instruction": "x", "outptu": "y"}, 7, ALPACA[2]], indent=2))
    with pytest.raises(MalformedRecordError, match=f"^{path}:7: unknown key 'outptu'"):
        read_json(path)
    report = DataReport()
    kept = read_json(path, report, on_malformed="drop")
    assert [e.messages[-1]["content"] for e in kept] == ["Blue.", "Hi."]
    assert (report.records, report.kept, report.dropped["malformed record"]) == (4, 2, 2)


def test_a_json_array_that_is_not_utf8_names_its_line_and_a_bom_is_accepted(tmp_path):
    path = tmp_path / "data.json"
    path.write_bytes(b'[\n{"instruction": "caf\xe9", "output": "b"}]')
    with pytest.raises(MalformedRecordError, match=f"^{path}:2: not UTF-8 text \\(byte 0xe9\\)"):
        read_json(path, on_malformed="drop")
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(ALPACA).encode())
    assert len(read_json(path)) == 3


# ------------------------------------------------------------------------------------------------ Parquet
def _write_parquet(path, records):
    """``records`` as a Parquet file, its schema inferred by pyarrow as ``datasets`` writes a Hub data set (a
    key some records lack is a null there)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(records), path, row_group_size=2)  # several row groups
    return path


def test_a_parquet_file_reads_as_its_records_would_as_json_lines(tmp_path):
    """A Hugging Face Hub data set's Parquet rows: chat ``messages`` (a list of structs), Alpaca rows whose
    ``input`` is null or empty, an ``id`` column (ignored and counted); each row named ``file:row N``."""
    chats = [{"id": f"c{i}", "messages": [{"role": "user", "content": f"q{i}"},
                                          {"role": "assistant", "content": f"a{i}"}]} for i in range(3)]
    path = _write_parquet(tmp_path / "train-00000-of-00001.parquet", chats)
    report = DataReport()
    read = load_examples(path, report)
    assert [e.messages for e in read] == [e.messages for e in read_jsonl(_write_jsonl(tmp_path / "c.jsonl", chats))]
    assert [e.source for e in read] == [f"{path}:row {n}" for n in (1, 2, 3)]
    assert (report.records, report.kept, report.ignored["id"]) == (3, 3, 3)
    alpaca = [{"instruction": "Add.", "input": "2 and 3", "output": "5"}, {"instruction": "Hi.", "output": "Hi!"},
              {"instruction": "Bye.", "input": "", "output": "Bye!"}]
    rows = read_parquet(_write_parquet(tmp_path / "alpaca.parquet", alpaca))
    assert [e.messages for e in rows] == [record_to_example(r, "x").messages for r in alpaca]
    assert [e.alpaca for e in rows] == [("Add.", "2 and 3"), ("Hi.", ""), ("Bye.", "")]
    # a folder holding Parquet beside JSON lines reads both
    both = load_examples(tmp_path)
    assert len(both) == 3 + 3 + 3


def test_a_malformed_parquet_row_is_named_and_can_be_dropped_and_a_broken_file_is_named(tmp_path):
    path = _write_parquet(tmp_path / "d.parquet", [{"instruction": "a", "output": "b"},
                                                   {"instruction": "c", "output": None},
                                                   {"instruction": "e", "output": "f"}])
    with pytest.raises(MalformedRecordError, match=f"^{path}:row 2: an Alpaca record needs 'output'"):
        read_parquet(path)
    report = DataReport()
    assert [e.messages[-1]["content"] for e in read_parquet(path, report, on_malformed="drop")] == ["b", "f"]
    assert (report.records, report.kept, report.dropped["malformed record"]) == (3, 2, 1)
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(MalformedRecordError, match="broken.parquet: not a readable Parquet file"):
        load_examples(tmp_path / "broken.parquet")


def test_a_hub_data_set_folder_of_several_splits_is_refused_and_a_pattern_names_one(tmp_path):
    """A downloaded Hub data set holds train and test shards side by side: read whole, the test split would be
    trained on, so the folder is refused naming the splits and a pattern that reads one; the pattern reads its
    shards in order (as does a pattern through ``qlora finetune``'s data check), and one that matches nothing, only
    folders, files that are not data, or a held-out split beside other files, is named."""
    from qlora_ref.train.api import check_data_spec

    data = tmp_path / "data"
    data.mkdir()
    rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(6)]
    for k in range(2):
        _write_parquet(data / f"train-0000{k}-of-00002.parquet", rows[3 * k:3 * k + 3])
    _write_parquet(data / "test-00000-of-00001.parquet", [{"prompt": "t", "completion": "u"}])
    refused = r"holds several splits of a data set \(test, train; held out: test-00000-of-00001.parquet\)"
    with pytest.raises(ValueError, match=refused + r".*--data '.*train-\*\.parquet'"):
        load_examples(data)
    for read_it in (load_examples, check_data_spec):  # a pattern over both splits too
        with pytest.raises(ValueError, match=refused):
            read_it(str(data / "*.parquet"))
    pattern = str(data / "train-*.parquet")
    check_data_spec(pattern)
    read = load_examples(pattern)
    assert [e.messages[-1]["content"] for e in read] == [f"a{i}" for i in range(6)]
    assert read[3].source == f"{data / 'train-00001-of-00002.parquet'}:row 1"
    assert len(load_examples(str(tmp_path / "**" / "test-*.parquet"))) == 1  # ** crosses folders; one split passes
    (tmp_path / "notes.txt").write_text("x")
    for bad, message in ((str(data / "dev-*.parquet"), "no file matches the pattern$"),
                         (str(tmp_path / "da*"), r"no file matches the pattern \(only folders: .*name a folder"),
                         (str(tmp_path / "*"), "matches files that are not")):
        for read_it in (load_examples, check_data_spec):
            with pytest.raises(ValueError, match=message):
                read_it(bad)


@pytest.mark.parametrize("names, held", [
    (["train-00000-of-00001-a09b74b3ef9c3b56.parquet", "test-00000-of-00001-0ab1c2d3e4f56789.parquet"], True),
    (["data.jsonl", "test.jsonl"], True),
    (["train.jsonl", "Validation.JSONL"], True),
    (["train_sft-00000-of-00001.parquet", "test_sft-00000-of-00001.parquet"], True),
    (["train.jsonl", "dev.json"], True),
    (["test.jsonl", "validation.jsonl"], True),
    (["train.jsonl", "training.jsonl"], False),
    (["alpaca-00000-of-00002.jsonl", "dolly-00000-of-00001.jsonl"], False),
    (["Train-00000-of-00001.jsonl", "train.jsonl"], False),
    (["test-00000-of-00002.jsonl", "test-00001-of-00002.jsonl"], False),
    (["contest.jsonl", "attestation.jsonl", "train.jsonl"], False),
])
def test_which_folders_hold_a_held_out_split_beside_other_data(tmp_path, names, held):
    """Hashed shard names of older ``datasets`` releases, a held-out file beside unnamed data, any case, split
    names with a suffix (UltraChat's test_sft): refused, the hint naming a training file; two names of the training
    split, two data sets' shards, one split's shards, words that merely contain "test": read."""
    for i, name in enumerate(names):
        path = tmp_path / name
        if name.endswith(".parquet"):
            _write_parquet(path, [{"prompt": f"q{i}", "completion": f"a{i}"}])
        else:
            _write_jsonl(path, [{"prompt": f"q{i}", "completion": f"a{i}"}])
    if held:
        with pytest.raises(ValueError, match="holds several splits of a data set") as e:
            load_examples(tmp_path)
        hint = Path(str(e.value).split("--data '")[1].split("'")[0]).name
        assert not re.match(r"(?i)(test|dev|val)", hint) or names == ["test.jsonl", "validation.jsonl"], hint
    else:
        assert len(load_examples(tmp_path)) == len(names)


# ------------------------------------------------------------------------------------------------ prompt-completion
def test_prompt_completion_records_train_the_completion_alone():
    """TRL's SFT format: strings are a user turn and its answer; lists are the prompt's turns and the completion's
    assistant turn, and only the completion is trained (TRL's completion_only_loss), the prompt's earlier answers
    being context — with a chat template and without one."""
    from qlora_ref.data import CHATML_TEMPLATE, render_chat_template

    chat = ByteTokenizer(CHATML_TEMPLATE)
    plain = record_to_example({"prompt": "What is 2+3?", "completion": "5"}, "x:1")
    assert plain.messages == [{"role": "user", "content": "What is 2+3?"}, {"role": "assistant", "content": "5"}]
    same = record_to_example({"input": "What is 2+3?", "output": "5"}, "x:1")
    for tok in (chat, TOK):  # one turn: what the input/output pair gives
        assert tokenize_example(plain, tok) == tokenize_example(same, tok)
    prompt = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q1"},
              {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"}]
    turns = record_to_example({"prompt": prompt, "completion": [{"role": "assistant", "content": "A2"}]}, "x:2")
    assert turns.messages == [*prompt, {"role": "assistant", "content": "A2"}]
    ids, labels = tokenize_example(turns, chat)
    assert chat.decode(ids) == render_chat_template(CHATML_TEMPLATE, turns.messages)
    assert _response(chat, ids, labels) == "A2<|im_end|>\n"
    ids, labels = tokenize_example(turns, TOK)
    assert _response(TOK, ids, labels) == "A2</s>" and "A1</s>" in TOK.decode(ids)
    # the same conversation as "messages" trains both answers
    ids, labels = tokenize_example(record_to_example({"messages": turns.messages}, "x:3"), chat)
    assert _response(chat, ids, labels) == "A1<|im_end|>\nA2<|im_end|>\n"


@pytest.mark.parametrize("record, message", [
    ({"prompt": "q", "completion": [{"role": "assistant", "content": "a"}]}, "must both be strings or both lists"),
    ({"prompt": [{"role": "user", "content": "q"}], "completion": []}, "'completion' must be one assistant message"),
    ({"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "user", "content": "a"}]},
     "'completion' must be one assistant message"),
    ({"prompt": [{"role": "assistant", "content": "q"}], "completion": [{"role": "assistant", "content": "a"}]},
     "turn 0 is 'assistant' where 'user' was expected"),
    ({"prompt": "q", "completoin": "a"}, "did you mean 'completion'"),
])
def test_a_malformed_prompt_completion_record_is_named(record, message):
    with pytest.raises(MalformedRecordError, match=f"^f.jsonl:4: .*{message}"):
        record_to_example(record, "f.jsonl:4")


# ------------------------------------------------------------------------------------------------ tool calls
#: written for these tests after the Hermes / Qwen2.5 convention: the tools' schemas in the system turn, each call
#: as JSON inside <tool_call> tags in the assistant's turn, results as user turns inside <tool_response> tags
TOOLS_TEMPLATE = (
    "{%- if tools %}{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\n<tools>' }}{%- for t in tools %}{{- '\\n' + (t | tojson) }}{%- endfor %}"
    "{{- '\\n</tools><|im_end|>\\n' }}"
    "{%- elif messages[0].role == 'system' %}{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'user' or (m.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}"
    "{%- elif m.role == 'assistant' %}{{- '<|im_start|>assistant\\n' + m.content }}"
    "{%- for c in m.tool_calls or [] %}"
    "{{- '\\n<tool_call>\\n{\"name\": \"' + c.function.name + '\", \"arguments\": ' + (c.function.arguments | tojson)"
    " + '}\\n</tool_call>' }}{%- endfor %}{{- '<|im_end|>\\n' }}"
    "{%- elif m.role == 'tool' %}"
    "{{- '<|im_start|>user\\n<tool_response>\\n' + m.content + '\\n</tool_response><|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"type": "string"}}}}}
CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
TOOL_CHAT = [{"role": "system", "content": "S"}, {"role": "user", "content": "Weather in Paris?"},
             {"role": "assistant", "content": "", "tool_calls": [CALL]},
             {"role": "tool", "content": "18 C, sunny"}, {"role": "assistant", "content": "18 C and sunny."}]


def test_tool_calls_are_trained_and_their_results_are_context():
    """A conversation with tool calls, as OpenAI, TRL and transformers write it: the template gets the tools and
    the calls, and renders what transformers renders; the assistant's calls and its answer are trained, the
    tools' schemas and the results are not."""
    transformers, tokenizers = pytest.importorskip("transformers"), pytest.importorskip("tokenizers")
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel({"<unk>": 0}, unk_token="<unk>"))
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, chat_template=TOOLS_TEMPLATE)
    tok = ByteTokenizer(TOOLS_TEMPLATE)
    example = record_to_example({"messages": TOOL_CHAT, "tools": [WEATHER]}, "x:1")
    assert example.messages == TOOL_CHAT and example.tools == [WEATHER]
    data = build_dataset([example], tok, 2000, warn=False)
    assert data.sources == ["x:1"]  # the template is prefix-consistent: one sequence
    ids, labels = data.input_ids[0].tolist(), data.labels[0].tolist()
    assert tok.decode(ids) == hf.apply_chat_template(TOOL_CHAT, tools=[WEATHER], tokenize=False)
    call = '\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>\n'
    assert _response(tok, ids, labels) == call + "18 C and sunny.<|im_end|>\n"
    prompt = tok.decode([i for i, lab in zip(ids, labels, strict=True) if lab == IGNORE_INDEX])
    assert '"description": "Weather in a city"' in prompt and "<tool_response>\n18 C, sunny" in prompt
    # the same data as TRL's prompt-completion record, tools as JSON text: the final answer alone is trained
    pc = record_to_example({"prompt": TOOL_CHAT[:-1], "completion": TOOL_CHAT[-1:], "tools": json.dumps([WEATHER])},
                           "x:2")
    assert pc.tools == [WEATHER]
    ids, labels = tokenize_example(pc, tok)
    assert tok.decode(ids) == hf.apply_chat_template(TOOL_CHAT, tools=[WEATHER], tokenize=False)
    assert _response(tok, ids, labels) == "18 C and sunny.<|im_end|>\n"


def test_sharegpt_function_call_and_observation_turns_are_tool_calls_and_results():
    """LLaMA-Factory's ShareGPT form with tools: a ``function_call`` turn holds the call as JSON text, an
    ``observation`` turn its result — the same example as the OpenAI-style record; a null content beside tool
    calls is an empty one, and a result nobody reads is trimmed and counted."""
    sharegpt = {"conversations": [
        {"from": "system", "value": "S"}, {"from": "human", "value": "Weather in Paris?"},
        {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})},
        {"from": "observation", "value": "18 C, sunny"}, {"from": "gpt", "value": "18 C and sunny."}],
        "tools": json.dumps([WEATHER])}
    assert record_to_example(sharegpt, "x:1") == record_to_example({"messages": TOOL_CHAT, "tools": [WEATHER]}, "x:1")
    llama31 = [dict(m, role="ipython") if m["role"] == "tool" else m for m in TOOL_CHAT]  # its role for results
    assert record_to_example({"messages": llama31}, "x:2").messages == TOOL_CHAT
    nulled = [dict(m, content=None) if "tool_calls" in m else m for m in TOOL_CHAT]
    assert record_to_example({"messages": nulled}, "x:2").messages == TOOL_CHAT
    report = DataReport()
    trailing = record_to_example({"messages": TOOL_CHAT[:4]}, "x:3", report)
    assert trailing.messages == TOOL_CHAT[:3] and "unanswered last tool turn" in report.summary()


@pytest.mark.parametrize("record, message", [
    ({"messages": [{"role": "user", "content": "q", "tool_calls": [CALL]}, {"role": "assistant", "content": "a"}]},
     "turn 0's 'tool_calls' must be a list of objects, on an assistant turn"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "", "tool_calls": CALL}]},
     "turn 1's 'tool_calls' must be a list of objects"),
    ({"messages": [{"role": "user", "content": "q"},
                   {"role": "assistant", "content": "", "tool_calls": [{"function": {"arguments": {}}}]}]},
     "turn 1's tool calls must each name their function"),
    ({"messages": [{"role": "user", "content": "q"},
                   {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": None}}]}]},
     "turn 1's tool calls must each name their function"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "tool", "content": "r"}]},
     "turn 1 is 'tool' where 'assistant' was expected"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "", "tool_calls": [CALL]},
                   {"role": "user", "content": "q2"}]}, "turn 2 is 'user' where 'tool' was expected"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant"}]}, "turn 1 must be an object with"),
    ({"messages": TOOL_CHAT, "tools": {"name": "f"}}, "'tools' must be a list of JSON schemas"),
    ({"messages": TOOL_CHAT, "tools": "[{"}, "'tools' is a string but not JSON"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "function_call", "value": "get_weather()"}]},
     "turn 1 \\('function_call'\\) must hold the JSON text"),
])
def test_malformed_tool_calls_are_named(record, message):
    with pytest.raises(MalformedRecordError, match=f"^f.jsonl:4: .*{message}"):
        record_to_example(record, "f.jsonl:4")


def test_a_template_without_tool_calling_and_the_alpaca_fallback_refuse_tool_calls():
    """A template that drops the calls would train the turn to say nothing, one that drops the tools would train
    calls of functions the prompt never showed: both are refused naming the turn — even where the function's name
    stands in the text anyway; so is the template-less Alpaca fallback, which has no place for them. Under
    ``--skip-malformed`` (``skip_unrenderable``) such an example is dropped and counted instead, as such a record
    was before tool calls were read."""
    from qlora_ref.data import CHATML_TEMPLATE
    from qlora_ref.data.pipeline import UNRENDERABLE
    from qlora_ref.data.tokenizer import ChatTemplateError

    with_tools = record_to_example({"messages": TOOL_CHAT, "tools": [WEATHER]}, "x:1")
    calls_only = record_to_example({"messages": TOOL_CHAT}, "x:2")
    chatml = ByteTokenizer(CHATML_TEMPLATE)
    with pytest.raises(ChatTemplateError, match="^x:2: the chat template renders turn 2 the same without its tool "
                                                "calls"):
        tokenize_example(calls_only, chatml)
    says_it = [*TOOL_CHAT[:2], dict(TOOL_CHAT[2], content="Let me get_weather for Paris."), *TOOL_CHAT[3:]]
    with pytest.raises(ChatTemplateError, match="^x:3: .* without its tool calls"):
        tokenize_example(record_to_example({"messages": says_it}, "x:3"), chatml)
    ignores_tools = TOOLS_TEMPLATE.replace("{%- if tools %}", "{%- if false %}")
    with pytest.raises(ChatTemplateError, match="^x:1: .* the same without the record's 'tools'"):
        tokenize_example(with_tools, ByteTokenizer(ignores_tools))
    tokenize_example(calls_only, ByteTokenizer(ignores_tools))  # calls without tools: nothing to miss
    for example in (with_tools, calls_only):
        with pytest.raises(ChatTemplateError, match="tool calls need the model's chat template"):
            tokenize_example(example, TOK)
    plain = record_to_example({"input": "q", "output": "a"}, "x:4")
    report = DataReport(records=2, kept=2)
    data = build_dataset([calls_only, plain], chatml, 2000, report=report, warn=False, skip_unrenderable=True)
    assert data.sources == ["x:4"] and report.dropped[UNRENDERABLE] == 1 and report.kept == 1


def test_a_template_that_fails_on_tool_turns_names_the_example():
    """A template that raises on roles it does not know (strict alternation) fails naming the record, whichever
    renderer runs it (ours, or a transformers tokenizer's)."""
    from qlora_ref.data.tokenizer import ChatTemplateError

    strict = ("{%- for m in messages %}{%- if m.role not in ['user', 'assistant'] or 'tool_calls' in m %}"
              "{{- raise_exception('Only user and assistant roles are supported!') }}{%- endif %}"
              "{{- m.role + ': ' + m.content + '\n' }}{%- endfor %}")
    example = record_to_example({"messages": TOOL_CHAT[1:]}, "x:9")
    with pytest.raises(ChatTemplateError, match="^x:9: the chat template failed: .*Only user and assistant"):
        tokenize_example(example, ByteTokenizer(strict))
    transformers, tokenizers = pytest.importorskip("transformers"), pytest.importorskip("tokenizers")
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel({"<unk>": 0}, unk_token="<unk>"))
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, chat_template=strict)
    with pytest.raises(ChatTemplateError, match="^x:9: the chat template failed: .*Only user and assistant"):
        tokenize_example(example, hf)


def test_empty_tool_calls_and_tools_are_none_and_other_formats_leave_tools_alone():
    """vLLM writes ``"tool_calls": []`` on every message: no calls. ``tools`` is read by the chat formats only:
    beside an Alpaca record it is metadata, ignored and counted, whatever it holds; a ``tool`` key is metadata
    too, not a misspelt ``tools``."""
    msgs = [{"role": "user", "content": "hi", "tool_calls": []}, {"role": "assistant", "content": "hello",
                                                                   "tool_calls": []}]
    assert record_to_example({"messages": msgs, "tools": []}, "x:1").messages == [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    report = DataReport()
    alpaca = record_to_example({"instruction": "Fix the shelf", "output": "ok", "tools": "hammer, saw"}, "x:2",
                               report)
    assert alpaca.tools is None and "ignored key 'tools'" in report.summary()
    assert record_to_example({"messages": msgs, "tool": "calculator"}, "x:3", report).tools is None
    assert "ignored key 'tool'" in report.summary()


def test_tool_calls_from_parquet_keep_only_their_own_arguments(tmp_path):
    """Parquet gives every row every field of a struct column, so one row's call arguments carry ``null`` for the
    keys of another row's: nulls at any depth are keys the row does not have, and each call reads as written."""
    search = {"type": "function", "function": {"name": "search", "arguments": {"query": "x"}}}
    rows = [{"messages": TOOL_CHAT},
            {"messages": [TOOL_CHAT[1], dict(TOOL_CHAT[2], tool_calls=[search]), TOOL_CHAT[3], TOOL_CHAT[4]]}]
    path = _write_parquet(tmp_path / "calls.parquet", rows)
    first, second = read_parquet(path)
    assert first.messages == TOOL_CHAT
    assert second.messages[1]["tool_calls"] == [search]
