"""Shared fixtures: a real redis-server on its own port, a tiny GPT-2 on disk, and
real worker and API processes talking to both."""

from __future__ import annotations

import fcntl
import itertools
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
import torch
from helpers import Proc, service_env, start_api, start_workers, wait_for_workers
from tiny_models import build_slow_gpt2, build_tiny_gpt2

from bench.cluster import start_redis

# One thread for the torch work of the test process itself (training the tiny models,
# reference completions): two pytest processes share 2 cores with the services they
# start, and there two threads each train about half as fast as one (measured: 32 s
# against 18 s for two tiny GPT-2 built at once). Workers get TORCH_THREADS=1 too
# (helpers.service_env).
torch.set_num_threads(1)

#: Test files by how long they take (most first), measured with `--durations`. Under
#: `make test` two pytest processes take files from the front of this order: the
#: long ones start first and the short ones fill in at the end, instead of one
#: process running a long file alone while the other sits idle.
LONGEST_FIRST = [
    "test_reliability.py",
    "test_client_matrix.py",
    "test_operator.py",
    "test_isolation.py",
    "test_bad_input.py",
    "test_cache.py",
    "test_page.py",
    "test_redis_faults.py",
    "test_engines.py",
    "test_upstream_stalls.py",
    "test_models.py",
    "test_batching.py",
    "test_llama_pass.py",
    "test_tools.py",
    "test_fairness.py",
    "test_responses_api.py",
    "test_reconnect.py",
    "test_smollm2.py",
    "test_structured.py",
    "test_scale_out.py",
    "test_thinking.py",
    "test_cli.py",
]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    # A stable sort: tests keep their order within a file.
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


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


_databases = itertools.cycle(range(1, 16))


@pytest.fixture
def isolated_redis_url(redis_url: str) -> Iterator[str]:
    """A Redis database of its own (emptied afterwards): for tests that leave jobs
    queued, or need an empty queue, without disturbing other services."""
    url = f"{redis_url.rsplit('/', 1)[0]}/{next(_databases)}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield url
    client.flushdb()
    client.close()


@pytest.fixture(scope="session")
def slow_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_slow_gpt2(tmp_path_factory.mktemp("models") / "slow-gpt2")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, worker_id: str) -> Path:
    """Built once per run: under xdist, the first pytest process trains it and the
    other waits for it (a file lock in the run's shared temporary folder)."""
    if worker_id == "master":  # one process: nothing to share
        return build_tiny_gpt2(tmp_path_factory.mktemp("models") / "tiny-gpt2")
    shared = tmp_path_factory.getbasetemp().parent / "tiny-gpt2"
    with open(f"{shared}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (shared / "done").exists():
            build_tiny_gpt2(shared)
            (shared / "done").touch()
    return shared


class Service:
    """One API process and a runner with N worker processes, sharing the test Redis."""

    def __init__(
        self, workdir: Path, env: dict[str, str], workers: int, concurrency: int = 1
    ) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.env = env
        self.workers: Proc | None = (
            start_workers(env, workdir, workers, concurrency=concurrency) if workers else None
        )
        self.api, self.base = start_api(env, workdir)
        if workers:
            wait_for_workers(self.base, workers, proc=self.workers)

    def stop(self) -> None:
        if self.workers:
            self.workers.stop()
        self.api.stop()


@pytest.fixture
def make_service(
    isolated_redis_url: str, tiny_model_dir: Path, tmp_path: Path
) -> Iterator[Callable[..., Service]]:
    """Build services with their own settings on an isolated Redis database."""
    made: list[Service] = []

    def make(
        workers: int = 1, model: Path | str | None = None, concurrency: int = 1, **env: str
    ) -> Service:
        model_id = str(model or tiny_model_dir)
        svc = Service(
            tmp_path / f"svc{len(made)}",
            service_env(isolated_redis_url, model_id, **env),
            workers,
            concurrency,
        )
        made.append(svc)
        return svc

    yield make
    for svc in made:
        svc.stop()


@pytest.fixture(scope="module")
def service(
    redis_url: str, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    """The whole pipeline with one worker on the tiny GPT-2."""
    svc = Service(tmp_path_factory.mktemp("svc"), service_env(redis_url, str(tiny_model_dir)), 1)
    yield svc
    svc.stop()
