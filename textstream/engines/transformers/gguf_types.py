"""QUANTIZE=auto: a GGUF model keeps its own quantization (worker side).

transformers dequantizes a GGUF file's weights to float, so the model it builds
is not the file's: the file's Q4_1 matrices become float32 ones that read 8x the
bytes per token. Here the file's header says what each weight was, and each
linear layer gets the kernel (quantize.py) that holds at least as much:

    Q4_0, Q4_1, Q4_K, and the 2/3-bit and IQ types  -> int4 (groups of 32, scale
        and offset each: Q4_1's and Q4_K's layout; Q4_0's symmetric values too)
    Q5_0, Q5_1, Q5_K, Q6_K, Q8_0, Q8_1, Q8_K        -> int8 (one scale per row)
    F32, F16, BF16, and any type not named here      -> float (not quantized)

The int4 layer requantizes the dequantized values with their group's min and max,
so a Q4_1 block comes back to the same 16 levels (its scale and offset rounded to
bfloat16): the file's model, not a second rounding of it. A Q4_0 block whose top
level (+7 steps) is unused, about half of them, is spread over a slightly wider
step and comes back within half of it. A tied head
(no `output.weight`, as SmolLM2's) is the file's `token_embd.weight` (Q8_0 there).

Only the header is read (`read_types`): the metadata is skipped, not decoded, so
SmolLM2's 49,152-token vocabulary costs milliseconds, not the gguf package's
seconds.
"""

from __future__ import annotations

import logging
import struct
from collections import Counter
from pathlib import Path
from typing import Any, BinaryIO

log = logging.getLogger(__name__)

#: GGML tensor type ids (ggml.h) by name, for the ones a plan names.
_TYPE_NAMES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1",
    10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS",
    17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S",
    23: "IQ4_XS", 28: "F64", 29: "IQ1_M", 30: "BF16", 34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4",
}  # fmt: skip
INT8 = {"Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q8_0", "Q8_1", "Q8_K"}
#: 4 bits or fewer a weight. Any other type (floats, integers, one this table
#: does not know) is left float.
INT4 = {
    "Q4_0", "Q4_1", "Q4_K", "Q2_K", "Q3_K", "IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S",
    "IQ4_NL", "IQ3_S", "IQ2_S", "IQ4_XS", "IQ1_M", "TQ1_0", "TQ2_0", "MXFP4",
}  # fmt: skip

# GGUF metadata value types: fixed sizes, and the two that are not (string, array).
_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9


def kernel_for(type_name: str) -> str | None:
    """The QUANTIZE kernel for a GGUF tensor type: 'int4', 'int8', or None (float)."""
    if type_name in INT4:
        return "int4"
    return "int8" if type_name in INT8 else None


class _Header:
    def __init__(self, stream: BinaryIO) -> None:
        self.stream = stream

    def take(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        data = self.stream.read(size)
        if len(data) != size:
            raise ValueError("the GGUF header ends early")
        return struct.unpack(fmt, data)[0]

    def string(self) -> str:
        size = self.take("<Q")
        if size > 1 << 24:  # a chat template is kilobytes: this is not a header
            raise ValueError("a GGUF header string is implausibly long")
        data = self.stream.read(size)
        if len(data) != size:
            raise ValueError("the GGUF header ends early")
        return data.decode("utf-8", "replace")

    def skip_value(self, kind: int, depth: int = 0) -> Any:
        """The value if a scalar or string (metadata we may read), else skipped.
        Arrays nest one level at most here (no real file nests deeper; a hostile
        one nesting thousands deep would exhaust the stack)."""
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            if depth > 1:
                raise ValueError("GGUF metadata arrays nested too deep")
            item, count = self.take("<I"), self.take("<Q")
            if item in _SIZES:
                self.stream.seek(_SIZES[item] * count, 1)
            else:  # strings (a vocabulary) or nested arrays: each has its own length
                for _ in range(count):
                    self.skip_value(item, depth + 1)
            return None
        if kind not in _SIZES:
            raise ValueError(f"unknown GGUF metadata type {kind}")
        return self.stream.read(_SIZES[kind])


def read_types(path: Path) -> tuple[str, dict[str, str]]:
    """(architecture, {tensor name: GGML type name}) from a GGUF file's header."""
    with path.open("rb") as stream:
        header = _Header(stream)
        if stream.read(4) != b"GGUF":
            raise ValueError(f"{path.name} is not a GGUF file")
        version = header.take("<I")
        if version < 2:
            raise ValueError(f"GGUF version {version} is not supported")
        tensors, fields = header.take("<Q"), header.take("<Q")
        arch = ""
        for _ in range(fields):
            key, kind = header.string(), header.take("<I")
            value = header.skip_value(kind)
            if key == "general.architecture" and isinstance(value, str):
                arch = value
        types: dict[str, str] = {}
        for _ in range(tensors):
            name = header.string()
            dims = header.take("<I")
            stream.seek(8 * dims, 1)
            kind = header.take("<I")
            header.take("<Q")  # the data's offset
            types[name] = _TYPE_NAMES.get(kind, f"type{kind}")
    return arch, types


def plan(model: Any, gguf_path: Path) -> dict[str, str | None]:
    """{linear module name: 'int4' | 'int8' | None} for `model` (built from
    `gguf_path`), each from its weight's type in the file. Modules the file does not
    name (none in a model transformers built from it) are left out: kept float."""
    import gguf
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    arch, types = read_types(gguf_path)
    arch_ids = {name: arch_id for arch_id, name in gguf.MODEL_ARCH_NAMES.items()}
    if arch not in arch_ids:
        raise ValueError(f"the gguf package does not know architecture {arch!r}")
    # The model transformers built from the file says how many blocks to map (a
    # tensor named blk.99999999 in a hostile header must not size the table).
    config = model.config.get_text_config(decoder=True)
    names = gguf.get_tensor_name_map(arch_ids[arch], int(config.num_hidden_layers))
    layers: dict[str, str | None] = {}
    for module, child in model.named_modules():
        if not isinstance(child, (nn.Linear, Conv1D)):
            continue
        # transformers names a GPT-2's blocks without its "transformer." prefix in
        # gguf's table on some versions: try the name as is, then without it.
        tensor = None
        for candidate in (module, module.partition(".")[2]):
            tensor = names.get_name(f"{candidate}.weight", try_suffixes=(".weight",))
            if tensor:
                break
        if tensor == "output.weight" and tensor not in types:
            tensor = "token_embd.weight"  # a tied head: the embedding's matrix
        if tensor in types:
            layers[module] = kernel_for(types[tensor])
    return layers


def describe(layers: dict[str, str | None], gguf_path: Path) -> str:
    """'int4: 210 layers, int8: 1, float: 0' for a log line."""
    counts = Counter(bits or "float" for bits in layers.values())
    parts = ", ".join(f"{bits}: {count}" for bits, count in sorted(counts.items()))
    return f"{gguf_path.name}'s own types ({parts} linear layers)"
