"""Writes the Parquet fixtures of tests/eval_data.rs with pyarrow, as Hugging Face datasets writes
its shards (a table with a string column; snappy pages by default).

    python3 -m venv /tmp/pa && /tmp/pa/bin/pip install pyarrow==18.1.0
    /tmp/pa/bin/python tests/data/make_parquet.py

docs.jsonl beside them holds the same documents, the form they are compared with."""

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq

HERE = os.path.dirname(os.path.abspath(__file__))

# A leading space, a newline inside, non-ASCII text, and a long document spanning several pages.
DOCS = [
    "In the beginning God created the heaven and the earth.",
    " And the earth was without form,\nand void.",
    "Sœur, naïve café: ünïcödé — and 漢字.",
    " ".join(f"word{i}" for i in range(3000)),
    "The last document.",
]

with open(os.path.join(HERE, "docs.jsonl"), "w", encoding="utf-8") as f:
    for i, text in enumerate(DOCS):
        f.write(json.dumps({"id": i, "text": text}, ensure_ascii=False) + "\n")

ids = pa.array(range(len(DOCS)), pa.int64())
table = pa.table({"id": ids, "text": pa.array(DOCS, pa.string())})
# Small row groups and pages, so reading crosses their boundaries.
for codec in ["snappy", "zstd", "gzip", "none"]:
    pq.write_table(
        table,
        os.path.join(HERE, f"docs-{codec}.parquet"),
        compression=codec,
        row_group_size=2,
        data_page_size=1024,
    )

# A null in the text column (skipped), and a table whose column is not text (refused).
with_null = pa.table({"text": pa.array([DOCS[0], None, DOCS[4]], pa.string())})
pq.write_table(with_null, os.path.join(HERE, "docs-null.parquet"))
numbers = pa.table({"text": pa.array([1, 2, 3], pa.int64())})
pq.write_table(numbers, os.path.join(HERE, "numbers.parquet"))

# A chat dataset shard, as HuggingFaceH4's (messages: list<struct<content, role>>), and its jsonl.
CHATS = [
    [
        {"content": "What is 2+2?", "role": "user"},
        {"content": "4.", "role": "assistant"},
        {"content": "And 3+3?", "role": "user"},
    ],
    [
        {"content": "Be brief.", "role": "system"},
        {"content": "Hi", "role": "user"},
        {"content": "Hello.", "role": "assistant"},
    ],
]
with open(os.path.join(HERE, "chat.jsonl"), "w", encoding="utf-8") as f:
    for turns in CHATS:
        f.write(json.dumps({"messages": turns}, ensure_ascii=False) + "\n")
turn = pa.struct([("content", pa.string()), ("role", pa.string())])
chat = pa.table({"messages": pa.array(CHATS, pa.list_(turn))})
pq.write_table(chat, os.path.join(HERE, "chat.parquet"))
