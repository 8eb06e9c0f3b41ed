"""Structured outputs: the JSON schema a completion must match, as an llguidance grammar.

Used by both processes. The API refuses a schema llguidance cannot compile (or
that would take it past its limits) before the job is queued, without a
tokenizer; the worker compiles it again against its model's tokenizer
(engines/transformers/constraints.py), once per schema (cached).

A schema travels in the job as canonical JSON text (no spaces), so that two
requests with the same schema share a response-cache key and a compiled grammar.
Its keys keep their order: the properties are generated in the order declared.
`{"type": "json_object"}` is the schema `{"type": "object"}`.

The JSON is compact (`whitespace_flexible: False`): no whitespace between tokens.
Flexible whitespace lets a weak model spend its whole budget on newlines, which
then ends in a truncated answer; a compact one is valid JSON all the same.
"""

from __future__ import annotations

import functools
import json
from typing import Any

from llguidance import LLMatcher, LLParserLimits

#: A longer schema is refused outright: its grammar takes long to build (a
#: 100,000-value enum takes half a second) and every job carries the text.
MAX_SCHEMA_CHARS = 32_768
#: Nesting deeper than this is refused before llguidance sees it (its own
#: recursion limit answers too, but Python's json would hit its own first).
MAX_SCHEMA_DEPTH = 64
#: `response_format: {"type": "json_object"}`: any JSON object.
JSON_OBJECT = '{"type":"object"}'

COMPILE_OPTIONS: Any = {"whitespace_flexible": False}


class GrammarError(ValueError):
    """The schema cannot constrain a completion: invalid, unsupported, or too
    costly to compile. Its text names the problem, never the schema's content."""


def parser_limits() -> LLParserLimits:
    """llguidance's default limits (each bounds the work of one compile or step),
    without parser state in error messages: those reach logs and clients."""
    return LLParserLimits(verbose_errors=False)


def canonical_schema(schema: Any) -> str:
    """A schema (a JSON object, or its JSON text) as the canonical text a job carries."""
    if isinstance(schema, str):
        if len(schema) > MAX_SCHEMA_CHARS:
            raise GrammarError(f"the schema is longer than {MAX_SCHEMA_CHARS} characters")
        try:
            schema = json.loads(schema)
        except (ValueError, RecursionError):
            raise GrammarError("the schema is not valid JSON") from None
    if not isinstance(schema, dict):
        raise GrammarError("the schema must be a JSON object")
    if _depth(schema) > MAX_SCHEMA_DEPTH:
        raise GrammarError(f"the schema nests deeper than {MAX_SCHEMA_DEPTH} levels")
    text = json.dumps(schema, separators=(",", ":"), ensure_ascii=False)
    if len(text) > MAX_SCHEMA_CHARS:
        raise GrammarError(f"the schema is longer than {MAX_SCHEMA_CHARS} characters")
    return text


def _depth(value: Any, limit: int = MAX_SCHEMA_DEPTH + 1) -> int:
    """How deep `value` nests (stops counting past `limit`, so never recurses far)."""
    if limit <= 0 or not isinstance(value, dict | list):
        return 0
    children = value.values() if isinstance(value, dict) else value
    return 1 + max((_depth(child, limit - 1) for child in children), default=0)


def schema_grammar(schema: str) -> str:
    """The llguidance grammar for a canonical schema text."""
    try:
        return str(LLMatcher.grammar_from_json_schema(schema, defaults=COMPILE_OPTIONS))
    except (ValueError, RecursionError) as exc:
        raise GrammarError(f"the schema cannot be compiled: {exc}") from None


@functools.lru_cache(maxsize=256)
def check_schema(schema: str) -> None:
    """Compile the schema's grammar without a tokenizer, within llguidance's limits;
    raise GrammarError if it cannot constrain a completion. Blocking: call it off
    the event loop. A schema that passed is remembered (clients send the same one
    again and again); a refused one is not (exceptions are never cached), but its
    compile is bounded."""
    grammar = schema_grammar(schema)
    error = LLMatcher.validate_grammar(grammar, None, limits=parser_limits())
    if error:
        raise GrammarError(f"the schema cannot be compiled: {error}")
