"""Use a trained model, in its family's own way.

    python scripts/generate.py runs/decoder-stdlib --prompt "def main(" --max-new-tokens 64 --top-p 0.9
    python scripts/generate.py runs/encoder_cpu --prompt "import <mask> as np" --top-k 5
    python scripts/generate.py runs/t5_cpu --prompt "for i in <extra_id_0>(10):"

decoder: continue the prompt (KV cache; temperature, top-k, top-p, greedy, stop at EOS).
encoder: the top-k candidates for each <mask> in the prompt, and the prompt with the likeliest in place
(one pass, nothing sampled: the generation flags are refused, named).
encoder_decoder: fill each <extra_id_N> sentinel of the prompt (the encoder output cached; greedy unless
--temperature > 0 samples the fills, with --top-k, --top-p, --seed, --num-samples of them).
The source is a run directory, a step-XXXXXXX folder, or a folder written by scripts/export_hf.py.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from llmtrain.cli import device, number
from llmtrain.inference.generate import fill_in, fill_mask, fill_spans, sample
from llmtrain.inference.loading import CheckpointError, load_trained_model, model_tokenizer


def check_flags(args: argparse.Namespace, family: str) -> None:
    """Refuse, by name, the flags that this family's use of the model would silently ignore (the generation
    flags default to None, so that a flag given can be told from its default)."""
    if family == "encoder":
        if args.top_k is not None and args.top_k < 1:
            raise ValueError(
                f"--top-k {args.top_k}: an encoder shows the k likeliest tokens per <mask>; allowed: 1 or more"
            )
        given = {
            "--max-new-tokens": args.max_new_tokens is not None,
            "--temperature": args.temperature is not None,
            "--greedy": args.greedy,
            "--top-p": args.top_p is not None,
            "--num-samples": args.num_samples is not None,
            "--seed": args.seed is not None,
            "--stop-at-eos": args.stop_at_eos is True,
            "--no-stop-at-eos": args.stop_at_eos is False,
            "--no-cache": args.no_cache,
        }
        flags = [flag for flag, is_given in given.items() if is_given]
        if flags:
            raise ValueError(
                f"{', '.join(flags)}: an encoder shows the k likeliest tokens per <mask> (--top-k) from one "
                "pass; it neither samples nor generates, so allowed: --top-k only"
            )
    elif family == "encoder_decoder":
        if args.stop_at_eos is False:
            raise ValueError(
                "--no-stop-at-eos: span filling reads the spans up to the decoder's EOS, so it always stops there"
            )
        sampling = not args.greedy and args.temperature is not None and args.temperature > 0
        # greedy fills are one fill whatever the seed: N samples would be N copies
        sampling_only = (
            ("--top-k", args.top_k),
            ("--top-p", args.top_p),
            ("--seed", args.seed),
            ("--num-samples", args.num_samples),
        )
        flags = [flag for flag, value in sampling_only if value is not None]
        if flags and not sampling:
            raise ValueError(
                f"{', '.join(flags)}: span filling is greedy unless --temperature > 0 samples the fills; "
                "add --temperature (e.g. 0.8) to sample"
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="run directory, step-XXXXXXX folder, or exported folder")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--tokenizer", help="tokenizer.json (default: the one beside the run, if found)")
    parser.add_argument("--max-new-tokens", type=number(int, minimum=1), help="default 64")
    parser.add_argument(
        "--temperature",
        type=number(float, minimum=0),
        help="0 = greedy; default: decoder 0.8, encoder_decoder 0 (greedy span filling)",
    )
    parser.add_argument("--greedy", action="store_true", help="same as --temperature 0")
    parser.add_argument(
        "--top-k",
        type=number(int, minimum=0, meaning=" (0 = off)"),
        help="sample among the k likeliest (0 = all); encoder: show k (>= 1); default 50",
    )
    parser.add_argument("--top-p", type=number(float, above=0, maximum=1), help="nucleus sampling mass")
    parser.add_argument("--num-samples", type=number(int, minimum=1), help="default 1")
    parser.add_argument("--seed", type=int, help="of the sampling (default 1337)")
    parser.add_argument("--stop-at-eos", action=argparse.BooleanOptionalAction, help="decoder (default: on)")
    parser.add_argument("--no-cache", action="store_true", help="re-run the whole sequence each step")
    parser.add_argument("--device", type=device, default="cpu")
    args = parser.parse_args(argv)
    try:
        loaded = load_trained_model(args.source, args.device)
        _, tok = model_tokenizer(loaded, args.tokenizer)
        check_flags(args, loaded.cfg.family)
    except (CheckpointError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    model, family = loaded.model, loaded.cfg.family
    max_new_tokens = 64 if args.max_new_tokens is None else args.max_new_tokens
    top_k = 50 if args.top_k is None else args.top_k
    num_samples = 1 if args.num_samples is None else args.num_samples
    temperature = args.temperature if args.temperature is not None else 0.8 if family == "decoder" else 0.0
    temperature = 0.0 if args.greedy else temperature
    generator = torch.Generator(device=args.device).manual_seed(1337 if args.seed is None else args.seed)
    try:
        if family == "encoder":
            result = fill_mask(model, tok, args.prompt, top_k)
            for i, candidates in enumerate(result):
                print(f"<mask> {i}: " + ", ".join(f"{t!r} {p:.3f}" for t, p in candidates))
            print(fill_in(tok, args.prompt, [candidates[0][0] for candidates in result]))
        elif family == "encoder_decoder":
            for n in range(num_samples):
                filled = fill_spans(
                    model,
                    tok,
                    args.prompt,
                    max_new_tokens,
                    temperature=temperature,
                    top_k=top_k,
                    top_p=args.top_p,
                    generator=generator,
                    use_cache=not args.no_cache,
                )
                if n:
                    print("-" * 40)
                for i, span in enumerate(filled.spans):
                    print(f"<extra_id_{i}>: {span!r}")
                print(filled.text)
        else:
            prompt = torch.tensor([tok.encode(args.prompt)] * num_samples, device=args.device)
            if prompt.shape[1] == 0:
                prompt = torch.full((num_samples, 1), tok.eos_id, device=args.device)  # start of a document
            start = time.perf_counter()
            out = sample(
                model,
                prompt,
                max_new_tokens,
                temperature=temperature,
                top_k=top_k,
                top_p=args.top_p,
                eos_token_id=tok.eos_id if args.stop_at_eos is not False else None,
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
