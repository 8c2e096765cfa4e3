"""Real instruction data for the GPU benchmarks (issue 36): the English chatterbot corpus (PyPI
``chatterbot-corpus``, BSD-3), packed into rows of a fixed length as the paper's recipe trains on
instruction data, with the loss on the responses only.

The GPU machine has no package registry, so the question/answer pairs travel with the repository in
``bench/data/chatterbot_english.jsonl.gz`` (37 KB: one JSON list of turns per conversation, written by
``python bench/corpus.py --write`` from the installed corpus through ``qlora_ref.data.load_chatterbot_corpus``).

Tokens: the models are drawn from their configs (no tokenizer ships for them), so the text is tokenized by
bytes — token = byte + 3 (0 pad, 1 BOS, 2 EOS), every id below 259, inside any LLaMA vocabulary. Each conversation
becomes ``<s>### Human: q ### Assistant: a</s>`` (the paper's OASST format, its ``qlora.py``), the labels -100 on
everything but the assistant's text and the EOS. Packing concatenates the conversations in a fixed shuffled order
and cuts rows of ``seq`` tokens (a conversation may run across two rows; attention runs across conversations in
a row, as packed training without document masks does): every row is full, so both stacks see the same number of
tokens and the same number of targets.
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

import numpy as np

from qlora_ref.loss import IGNORE_INDEX

PATH = Path(__file__).resolve().parent / "data" / "chatterbot_english.jsonl.gz"
PAD, BOS, EOS, OFFSET = 0, 1, 2, 3
IGNORE = IGNORE_INDEX  # -100: no loss on this position


def write(path: Path = PATH) -> int:
    """The installed corpus's English conversations into ``path`` (turn texts only); returns how many."""
    from qlora_ref.data import load_chatterbot_corpus

    examples = load_chatterbot_corpus("english")
    lines = [json.dumps([m["content"] for m in e.messages], ensure_ascii=False) for e in examples]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with gzip.GzipFile(tmp, "wb", mtime=0) as f:  # mtime 0: the same bytes every time
        f.write(("\n".join(lines) + "\n").encode())
    tmp.replace(path)
    return len(lines)


def conversations(path: Path = PATH) -> list[list[str]]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _bytes(text: str) -> list[int]:
    return [b + OFFSET for b in text.encode("utf-8")]


def encode(turns: list[str]) -> tuple[list[int], list[int]]:
    """(ids, labels) of one conversation: human/assistant turns alternate; only the assistant's text is a target."""
    ids, labels = [BOS], [IGNORE]
    for i, text in enumerate(turns):
        if i % 2 == 0:
            part = _bytes(f"### Human: {text} ### Assistant: ")
            ids += part
            labels += [IGNORE] * len(part)
        else:
            part = _bytes(f"{text} ")
            ids += part
            labels += part
    ids.append(EOS)
    labels.append(EOS)
    return ids, labels


def packed(seq: int, rows: int, seed: int = 0, path: Path = PATH) -> tuple[np.ndarray, np.ndarray]:
    """``rows`` rows of ``seq`` tokens (int64 ids, labels), the conversations packed in a shuffled order (``seed``),
    the corpus repeated if it runs out."""
    if seq < 2 or rows < 1:
        raise ValueError(f"seq must be >= 2 and rows >= 1, got seq={seq}, rows={rows}")
    convs = conversations(path)
    rng = np.random.default_rng(seed)
    ids: list[int] = []
    labels: list[int] = []
    need = seq * rows
    while len(ids) < need:
        for i in rng.permutation(len(convs)):
            a, b = encode(convs[i])
            ids += a
            labels += b
            if len(ids) >= need:
                break
    x = np.asarray(ids[:need], dtype=np.int64).reshape(rows, seq)
    y = np.asarray(labels[:need], dtype=np.int64).reshape(rows, seq)
    return x, y


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--write", action="store_true", help=f"write {PATH.name} from the installed chatterbot corpus")
    args = p.parse_args(argv)
    if args.write:
        print(f"{write()} conversations -> {PATH}")
    else:
        convs = conversations()
        x, y = packed(512, 4)
        print(f"{len(convs)} conversations; 4 x 512 packed: {int((y[:, 1:] != IGNORE).sum())} targets")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
