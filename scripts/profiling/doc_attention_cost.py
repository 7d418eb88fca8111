"""Step time with and without document-aware attention, interleaved in one process (decoder_small).

    python scripts/profiling/doc_attention_cost.py fp32|bf16

Two trainers on the bench's synthetic tokens; one gets windows with an EOS every 64 tokens and the CLM
objective's `document_ids` (block-diagonal causal masks), the other plain causal attention.
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts/
from bench import make_trainer

from llmtrain.data.prefetch import Prefetcher
from llmtrain.objectives import CausalLM

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("precision", nargs="?", default="fp32", choices=["fp32", "bf16"])
parser.add_argument("reps", nargs="?", type=int, default=4, help="timed steps of each trainer")
args = parser.parse_args()
precision, reps = args.precision, args.reps
with tempfile.TemporaryDirectory() as out:
    plain = make_trainer("decoder_small", precision, False, "single", None, Path(out) / "a")
    docs = make_trainer("decoder_small", precision, False, "single", None, Path(out) / "b")
    eos = docs.corpus.tokenizer.eos_id
    objective = CausalLM(docs.objective.seq_len, document_eos_id=eos)

    def with_documents(windows, generator):
        windows = windows.clone()
        windows[:, ::64] = eos  # documents of 64 tokens
        return objective(windows)

    docs.batches = Prefetcher(docs.train_loader, with_documents, docs.objective_rng, depth=0)
    plain.train_step(), docs.train_step()
    times = {"plain": [], "documents": []}
    for _ in range(reps):
        for name, trainer in (("plain", plain), ("documents", docs)):
            start = time.perf_counter()
            trainer.train_step()
            times[name].append(time.perf_counter() - start)
    for name, ts in times.items():
        print(
            f"{precision} {name:9s} steps (ms): {[round(x * 1e3) for x in ts]} median {statistics.median(ts) * 1e3:.0f}"
        )
    ratio = statistics.median(times["documents"]) / statistics.median(times["plain"])
    print(f"{precision} documents / plain: {ratio:.3f}x")
