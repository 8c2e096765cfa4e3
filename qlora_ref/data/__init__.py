"""Instruction data for QLoRA fine-tuning: reading (JSONL in several formats, the chatterbot corpus),
formatting with the model's chat template (Alpaca when it has none), response-only labels, length filtering
with a report, length-grouped padded batches or packed ones. Backend-neutral: ``qlora_gpu`` consumes the same
NumPy batches.

    examples = load_examples("train.jsonl")                 # or "chatterbot:english"
    data = build_dataset(examples, tokenizer, max_length=512)
    for batch in iterate_batches(data, batch_size=16, seed=0, epoch=0):
        batch["input_ids"], batch["attention_mask"], batch["labels"]   # int64 [B, T]
"""

from .formats import (
    DataReport,
    Example,
    MalformedRecordError,
    chatterbot_data_dir,
    load_chatterbot_corpus,
    load_examples,
    read_chatterbot_yaml,
    read_json,
    read_jsonl,
    read_parquet,
    record_to_example,
)
from .pipeline import (
    ALPACA_PROMPT_INPUT,
    ALPACA_PROMPT_NO_INPUT,
    IGNORE_INDEX,
    ChatTemplateError,
    TemplateRewritesHistory,
    TokenizedDataset,
    batch_indices,
    batch_of,
    build_dataset,
    collate,
    collate_packed,
    format_example,
    iterate_batches,
    iterate_packed_batches,
    length_grouped_order,
    pack_examples,
    packed_batch_indices,
    pad_token_id_of,
    prompt_ids,
    split_turns,
    token_segments,
    tokenize_example,
)
from .tokenizer import CHATML_TEMPLATE, ByteTokenizer, encode, has_chat_template, render_chat_template

__all__ = [
    "ALPACA_PROMPT_INPUT", "ALPACA_PROMPT_NO_INPUT", "ByteTokenizer", "CHATML_TEMPLATE", "ChatTemplateError",
    "DataReport", "Example", "IGNORE_INDEX", "MalformedRecordError", "TemplateRewritesHistory", "TokenizedDataset",
    "batch_indices", "batch_of", "build_dataset", "chatterbot_data_dir", "collate", "collate_packed", "encode",
    "format_example", "has_chat_template", "iterate_batches", "iterate_packed_batches", "length_grouped_order",
    "load_chatterbot_corpus", "load_examples", "pack_examples", "packed_batch_indices", "pad_token_id_of",
    "prompt_ids", "read_chatterbot_yaml", "read_json", "read_jsonl", "read_parquet", "record_to_example",
    "render_chat_template", "split_turns", "token_segments", "tokenize_example",
]
