"""Encoding speed of a byte-level BPE: tiktoken (as prepare_data builds it) against tokenizers, same texts.

    python scripts/profiling/tokenizer_speed.py TOKENIZER.json CORPUS.jsonl [DOCUMENTS]

MB of UTF-8 text per CPU-second for tiktoken's encode (special tokens allowed: a prompt's way) and its plain
path (encode_ordinary: documents, as prepare_data encodes them), and tokenizers' documents path
(`Tokenizer.encode_documents`: encode_batch_fast with special-token text read as text).
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from llmtrain.data.shards import tiktoken_encoding
from llmtrain.data.tokenizer import load_tokenizer

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("tokenizer", help="a byte-level BPE tokenizer.json")
parser.add_argument("corpus", help="a JSONL file with a text field")
parser.add_argument("documents", nargs="?", type=int, default=6000, help="documents read (default 6000)")
args = parser.parse_args()
tokenizer = load_tokenizer(args.tokenizer)
encoding = tiktoken_encoding(tokenizer)
if encoding is None:
    raise SystemExit(f"{args.tokenizer}: tiktoken cannot reproduce this tokenizer")
limit = args.documents
with open(args.corpus) as f:
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
