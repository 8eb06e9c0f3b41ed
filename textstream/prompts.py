"""Prompt text -> token ids, the same way in the worker (to generate) and in the API
(to refuse prompts longer than the model's context window before queueing them).
Works on any Hugging Face tokenizer object; imports nothing heavy."""

from __future__ import annotations

from typing import Any

from textstream.job import PromptFormat

#: Plain prompt layout for chat requests to models without a chat template (GPT-2).
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}: {{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


def encode_chat(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    template = None if tokenizer.chat_template else DEFAULT_CHAT_TEMPLATE
    encoded = tokenizer.apply_chat_template(
        messages, chat_template=template, add_generation_prompt=True, tokenize=True
    )
    if hasattr(encoded, "keys"):
        encoded = encoded["input_ids"]
    return [int(i) for i in encoded]


def encode_prompt(
    tokenizer: Any, prompt: str, prompt_format: PromptFormat, default: PromptFormat = "auto"
) -> list[int]:
    """`chat` wraps the prompt as one user message in the model's chat template;
    `auto` does so only when the tokenizer ships a template (an instruct model such
    as SmolLM2), so GPT-2 gets the raw text. `default` (PROMPT_FORMAT) decides `auto`."""
    fmt = default if prompt_format == "auto" else prompt_format
    if fmt == "chat" or (fmt == "auto" and bool(tokenizer.chat_template)):
        return encode_chat(tokenizer, [{"role": "user", "content": prompt}])
    return [int(i) for i in tokenizer.encode(prompt)]
