"""A typical schema for the structured-output benchmarks (bench/structured.py,
bench/grammar_engines.py): an array of at least 100 small records, so that a
constrained answer runs as long as a benchmark asks."""

from __future__ import annotations

from typing import Any

RECORDS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "people": {
            "type": "array",
            "minItems": 100,
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 20},
                    "age": {"type": "integer", "minimum": 0, "maximum": 120},
                    "email": {"type": "string", "pattern": "^[a-z]{1,10}@[a-z]{1,10}\\.com$"},
                    "role": {"enum": ["admin", "user", "guest"]},
                    "active": {"type": "boolean"},
                },
                "required": ["name", "age", "email", "role", "active"],
                "additionalProperties": False,
            },
        }
    },
    "required": ["people"],
    "additionalProperties": False,
}
