"""`POST /tokenize`, `POST /detokenize` and `GET /version`, as vLLM's server answers
them, with the API's copy of the served model's tokenizer (context_window.py).

/tokenize takes a `prompt` (raw text, special tokens added unless told not to) or
chat `messages` (the chat template, with the generation prompt unless told not
to) and answers `{"count", "max_model_len", "tokens", "token_strs"}`; /detokenize
takes `tokens` and answers `{"prompt"}`. Both are held to a job's bounds: the
prompt as a job's (MAX_PROMPT_CHARS, counted as a job counts a chat), the ids to
the context window. Until the tokenizer is loaded (or when it
cannot be: the fake engine has none) both answer 503 with Retry-After.

No `from __future__ import annotations`: FastAPI reads these signatures at run time.
"""

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from pydantic import Field

from textstream import __version__
from textstream.api.deps import services_of
from textstream.api.edge import authorize
from textstream.api.errors import InvalidInputError, ServiceError
from textstream.api.models import resolve_model
from textstream.api.protocol import Body, ChatMessage, Prompt
from textstream.api.submit import check_prompt
from textstream.prompts import DEFAULT_CHAT_TEMPLATE

router = APIRouter(dependencies=[Depends(authorize)])
public = APIRouter()


class TokenizerUnavailableError(ServiceError):
    status, error_type = 503, "tokenizer_unavailable"

    def __str__(self) -> str:
        return "the served model's tokenizer is not loaded here (yet); retry shortly"

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": "2"}


class TokenizeRequest(Body):
    model: str | None = None
    prompt: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)] | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class DetokenizeRequest(Body):
    model: str | None = None
    tokens: Annotated[list[Annotated[int, Field(ge=0)]], Field(max_length=1 << 20)]


async def tokenizer_of(request: Request, model: str | None) -> tuple[Any, int]:
    services = services_of(request)
    resolved = await resolve_model(services, model)
    current = services.prompt_tokens.current(resolved)
    if current is None and services.prompt_tokens.cannot_load(resolved):
        # An upstream engine, a fake one, a path only the worker's host has: no
        # retry will help, so not a 503.
        raise InvalidInputError(
            "model",
            f"this API has no tokenizer for {resolved!r} (an upstream's or the fake"
            " engine's, or one that failed to load here: see its log)",
        )
    if current is None:
        raise TokenizerUnavailableError()
    tokenizer, worker = current
    return tokenizer, worker.context_length


def encode(tokenizer: Any, body: TokenizeRequest) -> list[int]:
    if body.messages is not None:
        template = None if tokenizer.chat_template else DEFAULT_CHAT_TEMPLATE
        encoded = tokenizer.apply_chat_template(
            [m.as_dict() for m in body.messages],
            chat_template=template,
            add_generation_prompt=body.add_generation_prompt,
            tokenize=True,
        )
        ids = encoded["input_ids"] if hasattr(encoded, "keys") else encoded
        return [int(i) for i in ids]
    add_special = True if body.add_special_tokens is None else body.add_special_tokens
    return [int(i) for i in tokenizer.encode(body.prompt, add_special_tokens=add_special)]


@router.post("/tokenize")
async def tokenize(request: Request, body: TokenizeRequest) -> dict[str, Any]:
    if (body.prompt is None) == (body.messages is None):
        raise InvalidInputError("prompt", "give either `prompt` or `messages`")
    prompt = (
        Prompt("prompt", text=body.prompt or "")
        if body.messages is None
        else Prompt("messages", messages=[m.as_dict() for m in body.messages])
    )
    # The bounds of a job's prompt, checked as for a job: 28,000 empty messages were
    # tokenized here, where POST /jobs refuses them.
    check_prompt(prompt.checked_text, services_of(request), prompt.field)
    tokenizer, window = await tokenizer_of(request, body.model)
    ids = await asyncio.to_thread(encode, tokenizer, body)
    strs = tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None
    return {"count": len(ids), "max_model_len": window, "tokens": ids, "token_strs": strs}


@router.post("/detokenize")
async def detokenize(request: Request, body: DetokenizeRequest) -> dict[str, str]:
    tokenizer, window = await tokenizer_of(request, body.model)
    if window and len(body.tokens) > window:  # no text this model reads or writes is longer
        raise InvalidInputError("tokens", f"at most {window} tokens (the context window)")
    if body.tokens and max(body.tokens) >= len(tokenizer):
        raise InvalidInputError("tokens", f"token ids must be below {len(tokenizer)}")
    return {"prompt": await asyncio.to_thread(tokenizer.decode, body.tokens)}


@public.get("/version")
async def version() -> dict[str, str]:
    return {"version": __version__}
