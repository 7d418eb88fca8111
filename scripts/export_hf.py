"""Export a trained model to a Hugging Face folder that `from_pretrained(dir)` loads.

    python scripts/export_hf.py runs/gpt2-stdlib exported/gpt2-stdlib [--tokenizer PATH] [--verify]

The source is a run directory (its newest checkpoint), a step-XXXXXXX folder, or another exported folder.
The model must be one a Hugging Face class represents (the gpt2, llama, bert and t5 presets, and the default
decoder, which is a tied-head LLaMA); anything else is refused with the nearest preset. --verify loads the
folder with Transformers and compares its logits with llmtrain's. The destination must be new, empty, or an
earlier export, which is replaced only once the new folder is complete (a failure leaves it as it was).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from llmtrain.inference.export import export_hf
from llmtrain.inference.loading import CheckpointError, load_trained_model, model_tokenizer
from llmtrain.models import ModelConfigError
from llmtrain.models.hf import HF_CLASSES, hf_architecture


def verify(folder: Path, model: torch.nn.Module) -> float:
    """Largest |logit difference| between llmtrain and the Transformers model loaded from folder."""
    import transformers

    cfg = model.cfg
    hf_class = getattr(transformers, HF_CLASSES[hf_architecture(cfg)])
    hf = hf_class.from_pretrained(folder).eval()
    ids = torch.randint(
        5, cfg.vocab_size, (2, min(16, cfg.max_seq_len)), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        if cfg.family == "encoder_decoder":
            theirs, ours = hf(input_ids=ids, decoder_input_ids=ids).logits, model(ids, ids).logits
        else:
            theirs, ours = hf(input_ids=ids).logits, model(ids).logits
    return (theirs - ours).abs().max().item()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="run directory, step-XXXXXXX folder, or exported folder")
    parser.add_argument(
        "out",
        help="folder to write: new, empty, or an earlier export (replaced once the new one is complete)",
    )
    parser.add_argument("--tokenizer", help="tokenizer.json (default: the one beside the run, if found)")
    parser.add_argument(
        "--verify", action="store_true", help="compare logits with Transformers after writing"
    )
    args = parser.parse_args(argv)
    try:
        loaded = load_trained_model(args.source)
        arch = hf_architecture(loaded.cfg)
        tokenizer, _ = model_tokenizer(loaded, args.tokenizer)
        out = export_hf(loaded.model.state_dict(), loaded.cfg, args.out, tokenizer)
    except (ModelConfigError, CheckpointError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(
        f"wrote {out} from {loaded.source}: load it with transformers.{HF_CLASSES[arch]}.from_pretrained({str(out)!r})"
    )
    if args.verify:
        diff = verify(out, loaded.model)
        print(f"verify: max |logit difference| llmtrain vs transformers = {diff:.2e}")
        if diff > 1e-4:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
