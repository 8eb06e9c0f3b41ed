"""Shared fixtures: a real redis-server on its own port, a tiny GPT-2 on disk, and
real worker and API processes talking to both."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from helpers import Proc, service_env, start_api, start_workers, wait_for_workers
from tiny_models import build_tiny_gpt2

from bench.cluster import start_redis


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    proc, url = start_redis(tmp_path_factory.mktemp("redis"))
    yield url
    proc.terminate()
    proc.wait(10)


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_gpt2(tmp_path_factory.mktemp("models") / "tiny-gpt2")


class Service:
    """One API process and a runner with N worker processes, sharing the test Redis."""

    def __init__(self, workdir: Path, env: dict[str, str], workers: int) -> None:
        self.workdir = workdir
        self.env = env
        self.workers: Proc | None = start_workers(env, workdir, workers) if workers else None
        self.api, self.base = start_api(env, workdir)
        if workers:
            wait_for_workers(self.base, workers, proc=self.workers)

    def stop(self) -> None:
        if self.workers:
            self.workers.stop()
        self.api.stop()


@pytest.fixture(scope="module")
def service(
    redis_url: str, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    """The whole pipeline with one worker on the tiny GPT-2."""
    svc = Service(tmp_path_factory.mktemp("svc"), service_env(redis_url, str(tiny_model_dir)), 1)
    yield svc
    svc.stop()
