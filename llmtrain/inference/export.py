"""Write a Hugging Face folder: config.json, model.safetensors and the tokenizer files, which
`GPT2LMHeadModel`, `LlamaForCausalLM`, `BertForMaskedLM` or `T5ForConditionalGeneration.from_pretrained(dir)`
and `AutoTokenizer.from_pretrained(dir)` load."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from llmtrain.data.tokenizer import BOS, EOS, MASK, PAD, UNK, load_tokenizer, sentinel
from llmtrain.models import ModelConfig
from llmtrain.models.hf import CONFIG_FILE, WEIGHTS_FILE, hf_architecture, hf_config, to_hf_state_dict

TOKENIZER_FILE = "tokenizer.json"


def tokenizer_config(tokenizer_path: Path, max_seq_len: int) -> dict:
    """tokenizer_config.json for a PreTrainedTokenizerFast over llmtrain's byte-level BPE."""
    tok = load_tokenizer(tokenizer_path)
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "unk_token": UNK,
        "mask_token": MASK,
        "additional_special_tokens": [sentinel(i) for i in range(len(tok.sentinel_ids))],
        "model_max_length": max_seq_len,
        "clean_up_tokenization_spaces": False,
    }


def export_hf(
    state: dict[str, torch.Tensor], cfg: ModelConfig, out_dir: str | Path, tokenizer_path: str | Path | None
) -> Path:
    """Write the folder; refuses (UnsupportedArchitecture) before writing anything if no HF class fits."""
    from safetensors.torch import save_file

    hf_architecture(cfg)  # refuse early, naming the nearest preset
    tensors = to_hf_state_dict(state, cfg)
    bos, eos = 1, 2
    if tokenizer_path is not None:
        tok = load_tokenizer(tokenizer_path)
        if tok.vocab_size > cfg.vocab_size:
            raise ValueError(
                f"{tokenizer_path} has {tok.vocab_size} tokens but the model only {cfg.vocab_size}; "
                "pass the tokenizer the model was trained with"
            )
        bos, eos = tok.bos_id, tok.eos_id
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_FILE).write_text(json.dumps(hf_config(cfg, bos_token_id=bos, eos_token_id=eos), indent=2))
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    if tokenizer_path is not None:
        shutil.copyfile(tokenizer_path, out / TOKENIZER_FILE)
        config = tokenizer_config(Path(tokenizer_path), cfg.max_seq_len)
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
        specials = {
            k: v for k, v in config.items() if k.endswith("_token") or k == "additional_special_tokens"
        }
        (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))
    return out
