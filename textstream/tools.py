"""Tool calls (OpenAI's `tools`): the functions a chat offers, how a prompt shows
them, the schema a forced call must match, and how an answer becomes calls.

Used by both processes: the worker and the API's context-window count render the
prompt (prompts.py) the same way; the API builds the call schema and parses the
answer. Imports nothing heavy.

Rendering. A model whose chat template mentions `tools` gets them from its own
template (`apply_chat_template(tools=...)`), with assistant `tool_calls` and
`role: tool` results as the template takes them. Any other model gets the generic
rendering: a system block (GENERIC_INSTRUCTIONS) listing each function as JSON
and asking for `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`;
earlier calls are written into the assistant's text in that form, and tool
results become user messages in `<tool_response>` tags (Hermes' layout, which
many small instruct models were tuned on).

Answers. With `tool_choice` `required` or a named function, decoding is
constrained to `call_schema()`: a JSON call object (or a list of them for
parallel calls) whose `name` is a declared one and whose `arguments` match that
function's `parameters`, so the answer always parses. With `auto`, decoding is
free and the answer is searched for `<tool_call>` blocks (the generic format, and
Hermes/Qwen templates' own): blocks that parse and name a declared function
become calls, anything else stays text. A grammar allowing "text or a call"
would guarantee the call too, but constrains every token of a plain answer and
needs the model's own call format, which templates do not declare.
"""

from __future__ import annotations

import contextlib
import json
import secrets
from dataclasses import dataclass
from typing import Any

CALL_OPEN = "<tool_call>"
CALL_CLOSE = "</tool_call>"
#: A function's name: any text up to this long (OpenAI's is `^[a-zA-Z0-9_-]{1,64}$`;
#: other names are taken here and cannot escape the JSON, which quotes them).
MAX_NAME_CHARS = 256
MAX_TOOLS = 128
#: At most this many calls in one parallel answer (the schema's `maxItems`).
MAX_PARALLEL_CALLS = 8

GENERIC_INSTRUCTIONS = (
    "You can call functions. Their signatures, as JSON schemas:\n{functions}\n"
    "To call a function, answer with one line per call, exactly in this form and with "
    "nothing else:\n"
    '<tool_call>{{"name": "<function name>", "arguments": {{<arguments as JSON>}}}}</tool_call>\n'
    "A function's result comes back in <tool_response></tool_response> tags. "
    "If no function is needed, answer normally."
)


class ToolError(ValueError):
    """`tools` or `tool_choice` (`param`) is malformed; the text names the problem."""

    def __init__(self, message: str, param: str = "tools") -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class ToolUse:
    """How a chat answer is read: the declared functions' names, and whether
    decoding was constrained to call_schema() (the whole answer is the call JSON)."""

    names: frozenset[str]
    constrained: bool


def functions_of(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each tool's `function` ({name, description?, parameters?}), checked."""
    if len(tools) > MAX_TOOLS:
        raise ToolError(f"at most {MAX_TOOLS} tools")
    functions: list[dict[str, Any]] = []
    for tool in tools:
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or tool.get("type", "function") != "function":
            raise ToolError('each tool must be {"type": "function", "function": {...}}')
        name = function.get("name")
        if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_CHARS:
            raise ToolError(f"a function's name must be text of 1 to {MAX_NAME_CHARS} characters")
        parameters = function.get("parameters", {"type": "object"})
        if not isinstance(parameters, dict):
            raise ToolError("a function's parameters must be a JSON schema object")
        if not isinstance(function.get("description", ""), str):
            raise ToolError("a function's description must be text")
        functions.append({**function, "parameters": parameters})
    names = [f["name"] for f in functions]
    if len(set(names)) != len(names):
        raise ToolError("two tools have the same name")
    return functions


def chosen_name(tool_choice: Any) -> str | None:
    """The function a `{"type": "function", "function": {"name": ...}}` choice names."""
    if isinstance(tool_choice, dict):
        function = tool_choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if tool_choice.get("type") == "function" and isinstance(name, str):
            return name
    raise ToolError(
        'tool_choice must be none, auto, required or {"type": "function", ...}', "tool_choice"
    )


def call_schema(
    functions: list[dict[str, Any]], only: str | None, parallel: bool
) -> dict[str, Any]:
    """The JSON schema of a forced answer: one call (or 1..MAX_PARALLEL_CALLS of
    them), each naming a declared function (`only`, if given) with arguments that
    match that function's parameters."""
    chosen = [f for f in functions if only is None or f["name"] == only]
    # Where each function's arguments sit in the call schema: a parameters schema's
    # references to its own root (`#/$defs/...`, pydantic's nested models) are
    # rebased there, as its root is no longer the document's.
    at = "/items" if parallel else ""
    options = [
        {
            "type": "object",
            "properties": {
                "name": {"const": f["name"]},
                "arguments": rebased_refs(
                    f["parameters"],
                    f"{at}{'' if len(chosen) == 1 else f'/anyOf/{i}'}/properties/arguments",
                ),
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for i, f in enumerate(chosen)
    ]
    call = options[0] if len(options) == 1 else {"anyOf": options}
    if not parallel:
        return call
    return {"type": "array", "items": call, "minItems": 1, "maxItems": MAX_PARALLEL_CALLS}


#: grammars.MAX_SCHEMA_DEPTH (not imported: llguidance is heavy).
MAX_REBASE_DEPTH = 64
#: Keywords whose values are data, not schemas: a `$ref` inside them is no reference.
DATA_KEYWORDS = frozenset({"const", "enum", "default", "examples"})
#: Keywords whose values map names (any text: a property may be called `const`)
#: to schemas.
SCHEMA_MAPS = frozenset(
    {"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"}
)


def rebased_refs(schema: Any, pointer: str, depth: int = 0) -> Any:
    """`schema` with each `$ref` to a place in its own document (`#`, `#/...`) made
    to point there from a document that holds the schema at JSON `pointer`. Past
    MAX_REBASE_DEPTH levels the rest is left as it is: the call schema is refused
    as too deep anyway (grammars.canonical_schema), and recursion stays bounded."""
    if depth > MAX_REBASE_DEPTH or not isinstance(schema, dict | list):
        return schema
    if isinstance(schema, list):
        return [rebased_refs(item, pointer, depth + 1) for item in schema]
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key == "$ref" and isinstance(value, str) and (value == "#" or value.startswith("#/")):
            out[key] = "#" + pointer + value[1:]
        elif key in DATA_KEYWORDS:
            out[key] = value
        elif key in SCHEMA_MAPS and isinstance(value, dict):
            out[key] = {name: rebased_refs(sub, pointer, depth + 2) for name, sub in value.items()}
        else:
            out[key] = rebased_refs(value, pointer, depth + 1)
    return out


# -- rendering ------------------------------------------------------------------------


def template_takes_tools(tokenizer: Any) -> bool:
    """Whether the model's own chat template renders `tools` (a template that never
    mentions them would silently drop them)."""
    template = getattr(tokenizer, "chat_template", None)
    return isinstance(template, str) and "tools" in template


def generic_messages(
    messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None
) -> list[dict[str, Any]]:
    """The conversation in the generic rendering, as plain role/content messages."""
    out: list[dict[str, Any]] = []
    if tools:
        listed = "\n".join(json.dumps(t["function"], ensure_ascii=False) for t in tools)
        out.append({"role": "system", "content": GENERIC_INSTRUCTIONS.format(functions=listed)})
    for message in messages:
        content = message.get("content") or ""
        if message["role"] == "tool":
            out.append({"role": "user", "content": f"<tool_response>{content}</tool_response>"})
            continue
        calls = [
            CALL_OPEN + json.dumps(_template_call(c), ensure_ascii=False) + CALL_CLOSE
            for c in message.get("tool_calls") or []
        ]
        out.append({"role": message["role"], "content": "\n".join([content, *calls]).strip()})
    # Two system messages in a row read as one block to most templates.
    if len(out) > 1 and out[0]["role"] == out[1]["role"] == "system":
        out[:2] = [{"role": "system", "content": out[1]["content"] + "\n\n" + out[0]["content"]}]
    return out


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The conversation for a template that takes tools: call arguments as objects
    (templates write them with `tojson`; OpenAI sends them as JSON text)."""
    out = []
    for message in messages:
        calls = message.get("tool_calls")
        if calls:
            message = {**message, "tool_calls": [_template_call(c) for c in calls]}
        out.append(message)
    return out


def _template_call(call: dict[str, Any]) -> dict[str, Any]:
    function = call.get("function") or {}
    arguments = function.get("arguments", "{}")
    if isinstance(arguments, str):
        with contextlib.suppress(ValueError):
            arguments = json.loads(arguments)
    return {"name": function.get("name", ""), "arguments": arguments}


# -- answers --------------------------------------------------------------------------


def parse_calls(text: str, use: ToolUse) -> list[dict[str, Any]] | None:
    """The answer's calls as OpenAI's `tool_calls`, or None if it is text."""
    found: list[Any]
    # An upstream engine's calls come as `<tool_call>` blocks whatever the choice
    # (engines/openai.py); a constrained answer is never one.
    if use.constrained and not text.lstrip().startswith(CALL_OPEN):
        try:
            parsed = json.loads(text)
        except ValueError:  # cut by max_tokens
            return None
        found = parsed if isinstance(parsed, list) else [parsed]
    else:
        if CALL_OPEN not in text:
            return None
        found = []
        for block in text.split(CALL_OPEN)[1:]:
            try:
                found.append(json.loads(block.split(CALL_CLOSE)[0].strip()))
            except ValueError:
                return None
    calls = []
    for call in found:
        if not isinstance(call, dict) or call.get("name") not in use.names:
            return None
        arguments = call.get("arguments", call.get("parameters", {}))
        if isinstance(arguments, str):  # some models write the arguments as JSON text
            with contextlib.suppress(ValueError):
                arguments = json.loads(arguments)
        calls.append(
            {
                "id": f"call_{secrets.token_hex(12)}",
                "type": "function",
                "function": {
                    "name": call["name"],
                    "arguments": json.dumps(arguments, ensure_ascii=False),
                },
            }
        )
    return calls or None


class CallBuffer:
    """A streamed answer's text, held back from the point a call may begin: text
    before `<tool_call>` streams as it comes; from there on (or, constrained, from
    the start) it is kept, and at the end it is sent as `tool_calls` in one piece,
    or as text if it did not parse into calls."""

    def __init__(self, use: ToolUse) -> None:
        self.use = use
        self.held = ""
        self.calling = use.constrained

    def feed(self, text: str) -> str:
        """Text that may be sent now."""
        self.held += text
        if self.calling:
            return ""
        at = self.held.find(CALL_OPEN)
        if at >= 0:
            self.calling = True
            sent, self.held = self.held[:at], self.held[at:]
            return sent
        keep = next(
            (n for n in range(len(CALL_OPEN) - 1, 0, -1) if self.held.endswith(CALL_OPEN[:n])), 0
        )
        sent, self.held = self.held[: len(self.held) - keep], self.held[len(self.held) - keep :]
        return sent

    def finish(self) -> tuple[str, list[dict[str, Any]] | None]:
        """(text still to send, calls): calls when the held text parsed into them."""
        calls = parse_calls(self.held, self.use) if self.calling else None
        return ("" if calls else self.held), calls
