"""llmtrain's training step against Hugging Face Transformers' on the same shapes, batch and threads (CPU).

    python scripts/bench_hf.py                         # BERT and T5 v1.1 shapes, fp32 and bf16 autocast
    python scripts/bench_hf.py --layers 4 --width 256 --seq 128 --batch 8 --reps 5 --steps 3

One step = forward + backward + gradient clipping + AdamW (llmtrain's `build_optimizer`: fused on CPU), on
both sides. `--compile` compiles llmtrain's blocks (`parallel.compile=true`, as a user would train);
`--compile-hf` also compiles the Hugging Face model (`torch.compile(model)`), for the like-for-like figure. llmtrain runs its real Trainer.train_step (objective, prefetching loader, autocast) on the `model=bert`
and `model=t5` presets shrunk to the given shape; Hugging Face runs `BertForMaskedLM` (SDPA attention) and
`T5ForConditionalGeneration` with `feed_forward_proj="gated-gelu"` (v1.1) on a prepared batch of the same
shape (MLM labels on 15% of positions; span-corruption lengths from llmtrain's objective). Repetitions are
interleaved (llmtrain, HF, llmtrain, HF, ...) so both see the same machine load; the median step time of
each is reported with the ratio HF / llmtrain (> 1: llmtrain is faster). Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from bench import SyntheticTokenizer  # scripts/bench.py (scripts/ is on sys.path when run as a script)
from hydra import compose, initialize_config_dir
from transformers import BertConfig, BertForMaskedLM, T5Config, T5ForConditionalGeneration

from llmtrain.config import register_configs, to_dataclass
from llmtrain.data import Corpus
from llmtrain.measure.shapes import lengths_for
from llmtrain.models import count_parameters
from llmtrain.training.optim import build_optimizer
from llmtrain.training.trainer import Trainer

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
VOCAB = {"bert": 30528, "t5": 32128}


def llmtrain_trainer(preset: str, precision: str, args, out: Path) -> Trainer:
    """The real Trainer on the `model=<preset>` config shrunk to the benchmark shape, on synthetic tokens."""
    register_configs()
    d_ff = 4 * args.width if preset == "bert" else args.width * 8 // 3
    overrides = [
        f"model={preset}",
        f"model.d_model={args.width}",
        f"model.n_layers={args.layers}",
        f"model.n_heads={args.width // 64}",
        f"model.d_ff={d_ff}",
        f"model.vocab_size={VOCAB[preset]}",
        f"data.seq_len={args.seq}",
        f"trainer.micro_batch_size={args.batch}",
        f"trainer.precision={precision}",
        "trainer.progress=false",
        "trainer.checkpoint=false",
        "trainer.max_steps=1000000",
        "trainer.eval_batches=1",
        "logger.wandb=disabled",
        "logger.jsonl=false",
        f"output_dir={out}",
        f"run_name={preset}-{precision}",
        f"parallel.compile={str(args.compile).lower()}",
    ]
    if preset == "t5":
        overrides.append(f"model.n_decoder_layers={args.layers}")
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = to_dataclass(compose("train", overrides=overrides))
    vocab = VOCAB[preset]
    tokens = np.random.default_rng(0).integers(105, vocab, size=2_000_000).astype(np.uint32)
    return Trainer(cfg, corpus=Corpus(SyntheticTokenizer(vocab), tokens, tokens[:100_000], Path("synthetic")))


class HFStep:
    """A Hugging Face model with the same optimizer settings, stepping on one prepared batch."""

    def __init__(self, preset: str, precision: str, trainer: Trainer, args):
        m, vocab = trainer.cfg.model, VOCAB[preset]
        torch.manual_seed(0)
        if preset == "bert":
            config = BertConfig(
                vocab_size=vocab, hidden_size=m.d_model, num_hidden_layers=m.n_layers,
                num_attention_heads=m.n_heads, intermediate_size=m.d_ff, max_position_embeddings=m.max_seq_len,
                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, attn_implementation="sdpa",
            )  # fmt: skip
            self.model = BertForMaskedLM(config)
            ids = torch.randint(105, vocab, (args.batch, args.seq))
            labels = torch.full_like(ids, -100)
            selected = torch.rand(ids.shape) < trainer.cfg.objective.select_rate
            labels[selected] = ids[selected]
            self.batch = {"input_ids": ids, "labels": labels}
        else:
            config = T5Config(
                vocab_size=vocab, d_model=m.d_model, d_kv=m.head_dim, d_ff=m.d_ff, num_layers=m.n_layers,
                num_decoder_layers=m.n_decoder_layers or m.n_layers, num_heads=m.n_heads,
                feed_forward_proj="gated-gelu", dropout_rate=0.0, tie_word_embeddings=False,
                relative_attention_num_buckets=m.relative_buckets,
                relative_attention_max_distance=m.relative_max_distance, decoder_start_token_id=0, pad_token_id=0,
            )  # fmt: skip
            # transformers 5 forces tie_word_embeddings=True after reading False (which it keeps as
            # scale_decoder_outputs=False); v1.1 has an untied head, so untie it again
            config.tie_word_embeddings = False
            self.model = T5ForConditionalGeneration(config)
            # ... which also unties the encoder's and decoder's input embeddings from `shared`: share them again
            self.model.encoder.embed_tokens.weight = self.model.shared.weight
            self.model.decoder.embed_tokens.weight = self.model.shared.weight
            lengths = lengths_for(trainer.cfg)
            self.batch = {
                "input_ids": torch.randint(105, vocab, (args.batch, lengths.inputs)),
                "labels": torch.randint(105, vocab, (args.batch, lengths.targets)),
            }
        self.model.train()
        self.optimizer = build_optimizer(self.model, trainer.cfg.optim, "cpu")
        self.forward = torch.compile(self.model) if args.compile_hf else self.model
        self.precision, self.grad_clip = precision, trainer.cfg.optim.grad_clip

    def train_step(self) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            loss = self.forward(**self.batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def timed(step, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        step()
    return (time.perf_counter() - start) / n


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=["bert", "t5"], choices=["bert", "t5"])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--layers", type=int, default=4, help="blocks per stack")
    parser.add_argument("--width", type=int, default=256, help="d_model (heads of 64)")
    parser.add_argument("--seq", type=int, default=128, help="input length (T5: the encoder's)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--reps", type=int, default=5, help="interleaved repetitions")
    parser.add_argument("--steps", type=int, default=3, help="steps per repetition")
    parser.add_argument("--compile", action="store_true", help="llmtrain: parallel.compile=true")
    parser.add_argument("--compile-hf", action="store_true", help="torch.compile the Hugging Face model too")
    parser.add_argument("--json", default="bench_hf.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    results = []
    with tempfile.TemporaryDirectory() as out:
        pairs = {}
        for preset in args.models:
            for precision in args.precisions:
                trainer = llmtrain_trainer(preset, precision, args, Path(out))
                hf = HFStep(preset, precision, trainer, args)
                for _ in range(2 if args.compile or args.compile_hf else 1):  # warm-up (and compilation)
                    trainer.train_step(), hf.train_step()  # allocator, autocast caches, optimizer states
                pairs[preset, precision] = (trainer, hf)
        times = {key: ([], []) for key in pairs}
        for _ in range(args.reps):
            for key, (trainer, hf) in pairs.items():
                times[key][0].append(timed(trainer.train_step, args.steps))
                times[key][1].append(timed(hf.train_step, args.steps))
        for trainer, _ in pairs.values():
            trainer.guard.check()  # a non-finite step: raise, as a run would at its next log
        print(
            f"CPU threads {torch.get_num_threads()}; {args.layers} layers x {args.width}, seq {args.seq}, "
            f"batch {args.batch}; median of {args.reps} interleaved repetitions of {args.steps} steps; "
            f"compiled: llmtrain {args.compile}, HF {args.compile_hf}"
        )
        for (preset, precision), (trainer, hf) in pairs.items():
            ours, theirs = (statistics.median(t) for t in times[preset, precision])
            row = {
                "model": preset,
                "precision": precision,
                "llmtrain_params_m": count_parameters(trainer.model) / 1e6,
                "hf_params_m": sum(p.numel() for p in hf.model.parameters()) / 1e6,
                "llmtrain_step_ms": ours * 1e3,
                "hf_step_ms": theirs * 1e3,
                "speedup": theirs / ours,
                "llmtrain_steps_ms": [t * 1e3 for t in times[preset, precision][0]],
                "hf_steps_ms": [t * 1e3 for t in times[preset, precision][1]],
            }
            results.append(row)
            print(
                f"{preset:4s} {precision:4s} params llmtrain {row['llmtrain_params_m']:.2f}M / HF "
                f"{row['hf_params_m']:.2f}M  step llmtrain {row['llmtrain_step_ms']:8.1f} ms  HF "
                f"{row['hf_step_ms']:8.1f} ms  HF/llmtrain {row['speedup']:.2f}x",
                flush=True,
            )
    Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))


if __name__ == "__main__":
    main()
