"""Encoding speed of a byte-level BPE: tiktoken (as prepare_data builds it) against tokenizers, same texts.

    python scripts/profiling/tokenizer_speed.py TOKENIZER.json CORPUS.jsonl [DOCUMENTS]

MB of UTF-8 text per CPU-second for tiktoken's encode (special tokens allowed: a prompt's way) and its plain
path (encode_ordinary: documents, as prepare_data encodes them), and tokenizers' documents path
(`Tokenizer.encode_documents`: encode_batch_fast with special-token text read as text).
"""

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from llmtrain.data.shards import tiktoken_encoding
from llmtrain.data.tokenizer import load_tokenizer

tokenizer = load_tokenizer(sys.argv[1])
encoding = tiktoken_encoding(tokenizer)
if encoding is None:
    raise SystemExit(f"{sys.argv[1]}: tiktoken cannot reproduce this tokenizer")
limit = int(sys.argv[3]) if len(sys.argv) > 3 else 6000
with open(sys.argv[2]) as f:
    texts = [json.loads(line)["text"] for line, _ in zip(f, range(limit))]
mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
ways = {
    "tiktoken encode": lambda: [encoding.encode(t, allowed_special="all") for t in texts],
    "tiktoken encode_ordinary": lambda: [encoding.encode_ordinary(t) for t in texts],
    "tokenizers encode_documents": lambda: tokenizer.encode_documents(texts),
}
print(f"{len(texts)} documents, {mb:.1f} MB")
for name, encode in ways.items():
    start = time.process_time()
    encode()
    print(f"{name:30s} {mb / (time.process_time() - start):6.1f} MB per CPU-second")
