"""Write a Hugging Face folder: config.json, model.safetensors and the tokenizer files, which
`GPT2LMHeadModel`, `LlamaForCausalLM`, `BertForMaskedLM` or `T5ForConditionalGeneration.from_pretrained(dir)`
and `AutoTokenizer.from_pretrained(dir)` load."""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import torch
from tokenizers import processors

from llmtrain.data.tokenizer import BOS, EOS, MASK, PAD, UNK, load_tokenizer, sentinel
from llmtrain.inference.loading import TOKENIZER_FILE, check_tokenizer_fits, is_hf_folder
from llmtrain.models import ModelConfig
from llmtrain.models.hf import CONFIG_FILE, WEIGHTS_FILE, hf_architecture, hf_config, to_hf_state_dict


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


def eos_appending_tokenizer(tokenizer_path: Path) -> str:
    """The tokenizer.json of a T5 export: the run's, with a post-processor that ends each text with EOS.

    llmtrain's span-corruption inputs (and fill_spans' prompts) end with EOS, as Hugging Face's own T5 tokenizer
    ends them; without it `AutoTokenizer(text)` would give the model inputs it never saw. llmtrain itself never
    adds special tokens when encoding, so the export's ids are the run's either way. Decoder and BERT exports
    copy the run's tokenizer as it is: a decoder's prompt and an MLM window have no marker tokens added.
    """
    tok = load_tokenizer(tokenizer_path)  # read from the file: the run's own tokenizer.json stays as it is
    eos = tok.hf.id_to_token(tok.eos_id)
    tok.hf.post_processor = processors.TemplateProcessing(
        single=f"$A {eos}", pair=f"$A {eos} $B {eos}", special_tokens=[(eos, tok.eos_id)]
    )
    return tok.hf.to_str()


class ExportError(ValueError):
    """An export destination that cannot be used or written; the message names the folder."""


EXPORT_FILES = {CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE, "tokenizer_config.json", "special_tokens_map.json"}


def is_export(folder: Path) -> bool:
    """A folder written by export_hf: its config and weights, and nothing but the files an export holds."""
    entries = list(folder.iterdir())
    return is_hf_folder(folder) and all(e.name in EXPORT_FILES and e.is_file() for e in entries)


def check_destination(out: Path) -> bool:
    """Refuse a destination that is a file, or a non-empty folder other than an earlier export (a training
    run's folder, say, whose config.json an export would overwrite). True: an earlier export to replace."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} is a file; pass a folder to write the export into (it is created)")
    if not out.is_dir() or not any(out.iterdir()):
        return False
    if is_export(out):
        return True
    raise ExportError(
        f"{out} exists and is not an earlier export (it holds files other than {', '.join(sorted(EXPORT_FILES))}); "
        "pass a new or empty folder"
    )


def _write(folder: Path, tensors: dict, cfg: ModelConfig, tokenizer_path, bos: int, eos: int) -> None:
    from safetensors.torch import save_file

    (folder / CONFIG_FILE).write_text(
        json.dumps(hf_config(cfg, bos_token_id=bos, eos_token_id=eos), indent=2)
    )
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    if tokenizer_path is not None:
        if cfg.family == "encoder_decoder":
            (folder / TOKENIZER_FILE).write_text(eos_appending_tokenizer(Path(tokenizer_path)))
        else:
            shutil.copyfile(tokenizer_path, folder / TOKENIZER_FILE)
        config = tokenizer_config(Path(tokenizer_path), cfg.max_seq_len)
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
        specials = {
            k: v for k, v in config.items() if k.endswith("_token") or k == "additional_special_tokens"
        }
        (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))


def export_hf(
    state: dict[str, torch.Tensor], cfg: ModelConfig, out_dir: str | Path, tokenizer_path: str | Path | None
) -> Path:
    """Write the folder, or replace an earlier export there; refuses (ExportError, UnsupportedArchitecture)
    before writing anything. The files go into a hidden sibling folder renamed into place once complete, so
    a failure (a full disk, say) leaves the earlier export or nothing, never a mix."""
    from safetensors import SafetensorError

    out = Path(out_dir)
    replacing = check_destination(out)
    hf_architecture(cfg)  # refuse early, naming the nearest preset
    tensors = to_hf_state_dict(state, cfg)
    bos, eos = 1, 2
    if tokenizer_path is not None:
        tok = load_tokenizer(tokenizer_path)
        check_tokenizer_fits(tok, tokenizer_path, cfg.vocab_size)
        bos, eos = tok.bos_id, tok.eos_id
    partial = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}.partial"
    try:
        partial.mkdir(parents=True)
        _write(partial, tensors, cfg, tokenizer_path, bos, eos)
        if replacing:  # the earlier export steps aside, the new one takes its name, then the old one goes
            old = partial.with_suffix(".old")
            out.rename(old)
            try:
                partial.rename(out)
            except BaseException:
                old.rename(out)  # the earlier export back under its name
                raise
        else:
            partial.replace(out)  # over an empty folder too
    except BaseException as err:
        shutil.rmtree(partial, ignore_errors=True)
        if isinstance(err, (OSError, SafetensorError)):
            kept = "the earlier export there is unchanged" if replacing else "nothing was written"
            raise ExportError(
                f"could not write the export {out} ({type(err).__name__}: {err}); {kept}"
            ) from None
        raise
    if replacing:
        shutil.rmtree(old, ignore_errors=True)  # the new export is in place whatever happens to the old one
    return out
