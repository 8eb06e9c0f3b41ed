"""The installable package and its one command: `pip install` a built wheel into a
fresh virtual environment, `textstream serve` from it, stream, and stop it cleanly."""

from __future__ import annotations

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
    env.update(
        REDIS_URL=redis_url,
        MODEL_ID=model,
        MODEL_FALLBACK="",
        DEVICE="cpu",
        HF_HUB_OFFLINE="1",
        WORKER_HEARTBEAT_SECONDS="0.5",
        LOG_LEVEL="INFO",
        **extra,
    )
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
