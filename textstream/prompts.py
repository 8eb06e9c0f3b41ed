"""Prompt text -> token ids, the same way in the worker (to generate) and in the API
(to refuse prompts longer than the model's context window before queueing them).
Works on any Hugging Face tokenizer object; imports nothing heavy."""

from __future__ import annotations

from typing import Any

from textstream.job import PromptFormat
from textstream.tools import generic_messages, template_messages, template_takes_tools

#: Plain prompt layout for chat requests to models without a chat template (GPT-2):
#: "Role: content" lines, then "Assistant:". A content that already starts with a
#: space gets no second one, so an answer the model began as "Assistant:" + " Paris"
#: lays out the same when sent back as a message to continue.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}:"
    "{% if not message['content'].startswith(' ') %} {% endif %}{{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


def encode_chat(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    continue_final: bool = False,
    tools: list[dict[str, Any]] | None = None,
) -> list[int]:
    """Messages in the model's chat template, ending with the generation prompt; or,
    with `continue_final`, ending inside the last (assistant) message so that the
    model continues it (vLLM's `continue_final_message`). `tools` (OpenAI's), and
    messages with tool calls or results, go through the template when it takes
    tools, else through the generic rendering (tools.py)."""
    template = None if tokenizer.chat_template else DEFAULT_CHAT_TEMPLATE
    extra: dict[str, Any] = {}
    if template_takes_tools(tokenizer):
        messages = template_messages(messages)
        if tools:
            extra["tools"] = tools
    elif tools or any(m.get("tool_calls") or m["role"] == "tool" for m in messages):
        messages = generic_messages(messages, tools)
    encoded = tokenizer.apply_chat_template(
        messages,
        **extra,
        chat_template=template,
        add_generation_prompt=not continue_final,
        continue_final_message=continue_final,
        tokenize=True,
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
