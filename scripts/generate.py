"""Use a trained model, in its family's own way.

    python scripts/generate.py runs/decoder-stdlib --prompt "def main(" --max-new-tokens 64 --top-p 0.9
    python scripts/generate.py runs/encoder_cpu --prompt "import <mask> as np" --top-k 5
    python scripts/generate.py runs/t5_cpu --prompt "for i in <extra_id_0>(10):"

decoder: continue the prompt (KV cache; temperature, top-k, top-p, greedy, stop at EOS).
encoder: the top-k candidates for each <mask> in the prompt.
encoder_decoder: fill each <extra_id_N> sentinel of the prompt (greedy, the encoder output cached).
The source is a run directory, a step-XXXXXXX folder, or a folder written by scripts/export_hf.py.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from llmtrain.cli import device, number
from llmtrain.inference.generate import fill_mask, fill_spans, sample
from llmtrain.inference.loading import CheckpointError, load_trained_model, model_tokenizer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="run directory, step-XXXXXXX folder, or exported folder")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--tokenizer", help="tokenizer.json (default: the one beside the run, if found)")
    parser.add_argument("--max-new-tokens", type=number(int, minimum=1), default=64)
    parser.add_argument("--temperature", type=number(float, minimum=0), default=0.8, help="0 = greedy")
    parser.add_argument("--greedy", action="store_true", help="same as --temperature 0")
    parser.add_argument(
        "--top-k",
        type=number(int, minimum=0, meaning=" (0 = off)"),
        default=50,
        help="decoder: sample among the k likeliest (0 = all); encoder: show k (>= 1)",
    )
    parser.add_argument(
        "--top-p", type=number(float, above=0, maximum=1), default=None, help="decoder: nucleus sampling mass"
    )
    parser.add_argument("--num-samples", type=number(int, minimum=1), default=1)
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--stop-at-eos", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--no-cache", action="store_true", help="re-run the whole sequence each step")
    parser.add_argument("--device", type=device, default="cpu")
    args = parser.parse_args(argv)
    try:
        loaded = load_trained_model(args.source, args.device)
        _, tok = model_tokenizer(loaded, args.tokenizer)
        if loaded.cfg.family == "encoder" and args.top_k < 1:
            raise ValueError(
                "--top-k 0: an encoder shows the k likeliest tokens per <mask>; allowed: 1 or more"
            )
    except (CheckpointError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    model, family = loaded.model, loaded.cfg.family
    try:
        if family == "encoder":
            for i, candidates in enumerate(fill_mask(model, tok, args.prompt, args.top_k)):
                print(f"<mask> {i}: " + ", ".join(f"{t!r} {p:.3f}" for t, p in candidates))
        elif family == "encoder_decoder":
            filled = fill_spans(model, tok, args.prompt, args.max_new_tokens)
            for i, span in enumerate(filled.spans):
                print(f"<extra_id_{i}>: {span!r}")
            print(filled.text)
        else:
            generator = torch.Generator(device=args.device).manual_seed(args.seed)
            prompt = torch.tensor([tok.encode(args.prompt)] * args.num_samples, device=args.device)
            if prompt.shape[1] == 0:
                prompt = torch.full(
                    (args.num_samples, 1), tok.eos_id, device=args.device
                )  # start of a document
            start = time.perf_counter()
            out = sample(
                model,
                prompt,
                args.max_new_tokens,
                temperature=0.0 if args.greedy else args.temperature,
                top_k=args.top_k,
                top_p=args.top_p,
                eos_token_id=tok.eos_id if args.stop_at_eos else None,
                generator=generator,
                use_cache=not args.no_cache,
            )
            seconds = time.perf_counter() - start
            for row in out:
                print(args.prompt + tok.decode(row[prompt.shape[1] :].tolist()))
                print("-" * 40)
            new = out.shape[1] - prompt.shape[1]
            print(
                f"{new} tokens x {len(out)} in {seconds:.2f}s ({new * len(out) / max(seconds, 1e-9):.0f} tokens/s)",
                file=sys.stderr,
            )
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
