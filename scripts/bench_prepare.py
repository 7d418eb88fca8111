"""Throughput and memory of scripts/prepare_data.py: MB/s, MB per CPU-second, peak RSS, CPU seconds per stage.

    python scripts/bench_prepare.py web 30 120        # synthetic web-like prose (prepare=web), 30 and 120 MB
    python scripts/bench_prepare.py code 12 31        # the standard library's source (prepare=code)
    python scripts/bench_prepare.py web 30 --workers 2 --set prepare.curation.dedup.near=false

The web corpus is generated once into --cache (default /tmp/llmtrain-bench-prepare): documents of Zipf-sampled
words from a 30,000-word vocabulary (some accented, some with digits), sentences with commas and quotes, a few
non-ASCII characters per paragraph, and 3% exact copies, 3% near copies (a few words changed), 4% junk that the
filters remove. Each size runs scripts/prepare_data.py as a user would, into a fresh output folder, with a
tokenizer trained once per corpus kind (so the BPE training is not timed), and prints the report's figures.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SYLLABLES = (
    "ka lo mi ter van sul dor pe ris nol ba quen tro fi gar sta mon el ar pri con de tion ver ing".split()
)
ACCENTED = ["é", "ü", "ñ", "ø", "ç", "ß", "á"]
STOP = "the of and to that with have be in is it for on as was".split()


def _vocabulary(rng: np.random.Generator, n: int) -> list[str]:
    words: set[str] = set()
    while len(words) < n:
        parts = [SYLLABLES[i] for i in rng.integers(0, len(SYLLABLES), rng.integers(1, 5))]
        word = "".join(parts)
        if rng.random() < 0.03:
            word += ACCENTED[rng.integers(0, len(ACCENTED))]
        if rng.random() < 0.01:
            word += str(rng.integers(0, 2000))
        words.add(word)
    return [str(w) for w in rng.permutation(sorted(words))]  # frequency rank unrelated to spelling


def _document(rng: np.random.Generator, words: np.ndarray, cdf: np.ndarray) -> str:
    paragraphs = []
    for _ in range(rng.integers(2, 9)):
        sentences = []
        for _ in range(rng.integers(2, 7)):
            n = int(rng.integers(6, 22))
            chosen = words[np.minimum(np.searchsorted(cdf, rng.random(n)), len(words) - 1)].tolist()
            if n > 10 and rng.random() < 0.4:
                chosen[n // 2] += ","
            if rng.random() < 0.05:
                chosen[1] = f'"{chosen[1]}"'
            end = "." if rng.random() < 0.85 else ("?" if rng.random() < 0.5 else "!")
            sentences.append(" ".join(chosen).capitalize() + end)
        if rng.random() < 0.1:
            sentences.append("— “Quoted” words, 3.5 km…  and   spaces.")
        paragraphs.append(" ".join(sentences))
    return "\n\n".join(paragraphs)


def web_corpus(path: Path, megabytes: float, seed: int = 0) -> Path:
    """Write (once) a JSONL corpus of about `megabytes` MB of web-like documents."""
    if path.is_file():
        return path
    rng = np.random.default_rng(seed)
    vocab = _vocabulary(rng, 30_000)
    words = np.array(STOP + vocab, dtype=object)
    ranks = np.arange(1, len(words) + 1, dtype=np.float64)
    weights = 1 / ranks**1.05
    cdf = np.cumsum(weights / weights.sum())
    budget, used, docs = megabytes * 1e6, 0, []
    tmp = path.with_suffix(".tmp")
    with tmp.open("w") as f:
        while used < budget:
            r = rng.random()
            if r < 0.03 and docs:
                text = docs[rng.integers(0, len(docs))]  # an exact copy
            elif r < 0.06 and docs:
                tokens = docs[rng.integers(0, len(docs))].split(" ")
                for i in rng.integers(0, len(tokens), 3):
                    tokens[i] = str(words[rng.integers(0, len(words))])
                text = " ".join(tokens)  # a near copy: three words changed
            elif r < 0.10:
                text = "Buy now!!! ### $$$ click here " * int(rng.integers(1, 20))  # junk
            else:
                text = _document(rng, words, cdf)
                docs.append(text)
                if len(docs) > 2000:
                    docs.pop(int(rng.integers(0, len(docs))))
            f.write(json.dumps({"text": text}) + "\n")
            used += len(text.encode("utf-8"))
    tmp.replace(path)
    return path


def run(kind: str, megabytes: float, args: argparse.Namespace) -> dict:
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    out = cache / f"shards-{kind}-{megabytes:g}"
    shutil.rmtree(out, ignore_errors=True)
    tokenizer = cache / f"tokenizer-{kind}.json"
    if kind == "web":
        corpus = web_corpus(cache / f"web-{megabytes:g}.jsonl", megabytes)
        data = ["data=files", f"data.paths=[{corpus}]", "prepare=web"]
    else:
        data = ["data=stdlib", f"data.max_bytes={int(megabytes * 1e6)}", "prepare=code"]
    if tokenizer.is_file():
        data.append(f"data.tokenizer.path={tokenizer}")
    overrides = [*data, f"prepare.output_dir={out}", f"prepare.workers={args.workers}",
                 f"data.cache_dir={cache / 'cache'}", *args.set]  # fmt: skip
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "prepare_data.py"), *overrides],
                          capture_output=True, text=True, cwd=ROOT)  # fmt: skip
    if proc.returncode != 0:
        raise SystemExit(f"prepare_data.py {' '.join(overrides)} failed:\n{proc.stderr[-3000:]}")
    if not tokenizer.is_file():
        shutil.copy(out / "tokenizer.json", tokenizer)
    report = json.loads((out / "report.json").read_text())
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("kind", choices=("web", "code"))
    parser.add_argument("sizes", nargs="+", type=float, help="corpus sizes in MB")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cache", default="/tmp/llmtrain-bench-prepare")
    parser.add_argument("--set", nargs="*", default=[], help="extra Hydra overrides")
    parser.add_argument("--keep", action="store_true", help="keep the shard folders")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    results = []
    for size in args.sizes:
        r = run(args.kind, size, args)
        stages = {name: s["cpu_seconds"] for name, s in r["stages"].items()}
        mb = r["input"]["bytes"] / 1e6
        results.append({"kind": args.kind, "mb": round(mb, 1), **{k: r[k] for k in ("mb_per_s", "mb_per_cpu_second",
                        "wall_seconds", "cpu_seconds", "peak_rss_mb", "kept_fraction")}, "stage_cpu_seconds": stages})  # fmt: skip
        print(f"{args.kind} {mb:.1f} MB, {args.workers} workers: {r['mb_per_s']:.2f} MB/s, "
              f"{r['mb_per_cpu_second']:.2f} MB per CPU-second ({r['cpu_seconds']:.1f} CPU-s), peak RSS "
              f"{r['peak_rss_mb']['main']:.0f} MB main / {r['peak_rss_mb']['largest_worker']:.0f} MB worker")  # fmt: skip
        accounted = sum(stages.values())
        for name, seconds in stages.items():
            print(f"    {name:<18} {seconds:8.2f} CPU-s  {seconds / r['cpu_seconds']:6.1%}")
        print(f"    {'(other)':<18} {r['cpu_seconds'] - accounted:8.2f} CPU-s  "
              f"{(r['cpu_seconds'] - accounted) / r['cpu_seconds']:6.1%}  reading, IPC, writing, dedup state")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
