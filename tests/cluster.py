"""A real local Redis Cluster for tests: 6 ``redis-server --cluster-enabled yes`` processes
(3 masters, 1 replica each) on free ports in a folder of the test's own, joined with
``redis-cli --cluster create --cluster-replicas 1``.

:class:`LocalCluster` starts it, waits until every node says ``cluster_state:ok`` and every
replica's link to its master is up, and offers what fault-injection tests need: which node
serves a key, its replica, SIGKILL/SIGSTOP/SIGCONT of one node, a forced failover, a restart
of a killed node (it rejoins as a replica). ``stop()`` ends only its own processes.

Every node runs with ``appendonly yes`` and ``appendfsync always`` (what ``deltaflush
doctor`` asks for) and a node timeout of 2 s, so a failover takes a few seconds.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from redis.cluster import key_slot

from tests.conftest import ROOT, wait_for

NODE_TIMEOUT_MS = 2000


def cluster_fleet_env(cluster: LocalCluster, broker: str, storage: Path | str,
                      prefix: str | None = None, **more: str) -> dict[str, str]:
    """The environment of a fleet (``celery -A workers.app`` worker and beat) on ``cluster``
    with ``broker`` (RabbitMQ: a cluster cannot be the broker) and ``storage``: short leases
    and flush intervals and small files, so that a test's rows flush in many rounds; keys
    under ``prefix`` (a test's own on the shared cluster); ``more`` set on top."""
    env = dict(os.environ, DELTAFLUSH_REDIS_URL=cluster.url, DELTAFLUSH_BROKER_URL=broker,
               DELTAFLUSH_STORAGE_URI=str(storage), DELTAFLUSH_LEASE_S="2",
               DELTAFLUSH_FLUSH_INTERVAL_S="0.5", DELTAFLUSH_MAX_FILE_BYTES="65536",
               PYTHONPATH=str(ROOT))
    if prefix is not None:
        env["DELTAFLUSH_KEY_PREFIX"] = prefix
    env.update(more)
    return env


def free_cluster_port(taken: frozenset[int] | set[int] = frozenset()) -> int:
    """A free port P whose cluster bus port P + 10000 is free too. Ports come from 20000-
    29999, so no node's port is another node's bus port (30000-39999); ``taken``: the ports
    of this cluster's other nodes."""
    for _ in range(200):
        port = random.randint(20000, 29999)
        if port in taken:
            continue
        try:
            for p in (port, port + 10000):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
        except OSError:
            continue
        return port
    raise RuntimeError("no free pair of ports for a cluster node")


@dataclass
class Node:
    """One redis-server of the cluster."""

    port: int
    folder: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def client(self, readonly: bool = False) -> redis.Redis:
        """A plain client of this node; ``readonly``: one that reads a replica's own data
        (``READONLY``) instead of being redirected to its master."""
        client = redis.Redis(port=self.port, socket_connect_timeout=2, socket_timeout=10,
                             single_connection_client=readonly)
        if readonly:
            client.execute_command("READONLY")
        return client

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def info(self, section: str) -> dict[str, object]:
        with self.client() as c:
            return dict(c.info(section))

    def cluster_info(self) -> dict[str, str]:
        with self.client() as c:
            raw = c.execute_command("CLUSTER", "INFO")
        text = raw.decode() if isinstance(raw, bytes) else str(raw)
        return dict(line.split(":", 1) for line in text.split() if ":" in line)

    def role(self) -> str:
        return str(self.info("replication")["role"])


class LocalCluster:
    """Six nodes in ``folder``: 3 masters with one replica each (see the module doc)."""

    def __init__(self, folder: Path, nodes: int = 6, replicas: int = 1) -> None:
        self.folder = folder
        self.replicas = replicas
        self.nodes: list[Node] = []
        for i in range(nodes):
            port = free_cluster_port({n.port for n in self.nodes})
            self.nodes.append(Node(port, folder / f"node{i}"))

    # --- life cycle --------------------------------------------------------------------

    def start(self, attempts: int = 3) -> LocalCluster:
        """Start the nodes and join them; with fresh ports again if a node could not start
        (another process took its port since it was chosen)."""
        for attempt in range(attempts):
            try:
                self._start()
                return self
            except BaseException:
                self.stop()
                port_taken = any("Address already in use" in self.log_tail(n)
                                 for n in self.nodes)
                if attempt == attempts - 1 or not port_taken:
                    raise
                self._fresh_ports()
        return self

    def _fresh_ports(self) -> None:
        for i, node in enumerate(self.nodes):
            shutil.rmtree(node.folder, ignore_errors=True)
            node.port = free_cluster_port({n.port for n in self.nodes[:i]})

    def _start(self) -> None:
        for node in self.nodes:
            node.folder.mkdir(parents=True, exist_ok=True)
            self._spawn(node)
        for node in self.nodes:
            wait_for(lambda n=node: _ping(n) or not n.alive(), 10,
                     f"node {node.port} to start")
            assert node.alive(), f"redis-server {node.port} exited: {self.log_tail(node)}"
        cli = shutil.which("redis-cli")
        if cli is None:
            pytest.fail("redis-cli is not installed (apt-get install redis-tools)")
        made = subprocess.run(
            [cli, "--cluster", "create", *(n.address for n in self.nodes),
             "--cluster-replicas", str(self.replicas), "--cluster-yes"],
            capture_output=True, text=True, timeout=60)
        assert made.returncode == 0, made.stdout + made.stderr
        self.wait_healthy()

    def _spawn(self, node: Node) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed (apt-get install redis-server)")
        node.proc = subprocess.Popen(
            [binary, "--port", str(node.port), "--bind", "127.0.0.1",
             "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
             "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
             "--appendonly", "yes", "--appendfsync", "always", "--save", "",
             "--dir", str(node.folder), "--logfile", str(node.folder / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def wait_healthy(self, timeout: float = 60) -> None:
        """Until every live node says ``cluster_state:ok``, knows every node, and every
        live replica's link to its master is up."""
        def healthy() -> bool:
            try:
                for node in self.live():
                    info = node.cluster_info()
                    if info.get("cluster_state") != "ok" or \
                            int(info.get("cluster_known_nodes", 0)) != len(self.nodes):
                        return False
                    repl = node.info("replication")
                    if repl["role"] == "slave" and repl.get("master_link_status") != "up":
                        return False
                return True
            except redis.RedisError:
                return False
        wait_for(healthy, timeout, "the cluster to be healthy", interval=0.2)

    def live(self) -> list[Node]:
        return [n for n in self.nodes if n.alive()]

    def stop(self) -> None:
        """End this cluster's own processes (SIGCONT first: a stopped one cannot exit)."""
        for node in self.nodes:
            if node.alive():
                assert node.proc is not None
                node.proc.send_signal(signal.SIGCONT)
                node.proc.kill()
        for node in self.nodes:
            if node.proc is not None:
                node.proc.wait(10)
                node.proc = None

    def log_tail(self, node: Node) -> str:
        log = node.folder / "redis.log"
        return log.read_text(errors="replace")[-2000:] if log.exists() else "(no log)"

    # --- who serves what ---------------------------------------------------------------

    @property
    def url(self) -> str:
        """A URL naming one (live) node: all a client needs to find the others."""
        return self.live()[0].url

    def by_port(self, port: int) -> Node:
        return next(n for n in self.nodes if n.port == port)

    def masters(self) -> list[Node]:
        return [n for n in self.live() if n.role() == "master"]

    def master_of(self, key: str) -> Node:
        """The node serving ``key``'s slot now."""
        return self.master_of_slot(key_slot(key.encode()))

    def replica_of(self, master: Node) -> Node:
        """A live replica of ``master``."""
        for node in self.live():
            repl = node.info("replication")
            if repl["role"] == "slave" and int(repl["master_port"]) == master.port:
                return node
        raise AssertionError(f"node {master.port} has no live replica")

    def node_id(self, node: Node) -> str:
        with node.client() as c:
            return str(c.execute_command("CLUSTER", "MYID").decode())

    def migrate_slot(self, slot: int, target: Node, pause_s: float = 0.0) -> int:
        """Move ``slot`` to the master ``target`` the way ``redis-cli --cluster reshard``
        does (``CLUSTER SETSLOT ... IMPORTING/MIGRATING``, ``MIGRATE`` key by key, then
        ``SETSLOT ... NODE`` everywhere), sleeping ``pause_s`` between keys so that clients
        meet the slot half moved (``ASK``, ``TRYAGAIN``). Returns the keys moved."""
        source = self.by_port(self.master_of_slot(slot).port)
        assert source.port != target.port
        src_id, dst_id = self.node_id(source), self.node_id(target)
        with target.client() as dst, source.client() as src:
            dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
            src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
            moved = 0
            while True:
                keys = src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 10)
                if not keys:
                    break
                for key in keys:
                    src.execute_command("MIGRATE", "127.0.0.1", target.port, key, 0, 10000)
                    moved += 1
                    time.sleep(pause_s)
            for node in (target, source, *(n for n in self.masters()
                                           if n.port not in (target.port, source.port))):
                with node.client() as c:
                    c.execute_command("CLUSTER", "SETSLOT", slot, "NODE", dst_id)
        return moved

    def slots_of(self, master: Node) -> list[int]:
        """The slots ``master`` serves, in ascending order, per its own ``CLUSTER SLOTS``."""
        with master.client() as c:
            ranges = c.execute_command("CLUSTER", "SLOTS")
        return sorted(slot for start, end, owner, *_ in ranges if int(owner[1]) == master.port
                      for slot in range(start, end + 1))

    def reshard(self, source: Node, target: Node, slots: int) -> str:
        """Move ``slots`` slots from ``source`` to ``target`` with the real command,
        ``redis-cli --cluster reshard ... --cluster-yes`` (it takes the source's slots in
        ascending order); returns its output."""
        cli = shutil.which("redis-cli")
        assert cli is not None, "redis-cli is not installed (apt-get install redis-tools)"
        done = subprocess.run(
            [cli, "--cluster", "reshard", source.address,
             "--cluster-from", self.node_id(source), "--cluster-to", self.node_id(target),
             "--cluster-slots", str(slots), "--cluster-yes"],
            capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    def master_of_slot(self, slot: int) -> Node:
        for node in self.live():
            try:
                with node.client() as c:
                    for start, end, master, *_ in c.execute_command("CLUSTER", "SLOTS"):
                        if start <= slot <= end:
                            return self.by_port(int(master[1]))
            except redis.RedisError:
                continue
        raise AssertionError(f"no live node knows who serves slot {slot}")

    # --- faults ------------------------------------------------------------------------

    def kill(self, node: Node) -> None:
        """SIGKILL one node (its AOF stays, for ``restart``)."""
        assert node.proc is not None
        node.proc.send_signal(signal.SIGCONT)
        node.proc.kill()
        node.proc.wait(10)

    def pause(self, node: Node) -> None:
        assert node.proc is not None
        node.proc.send_signal(signal.SIGSTOP)

    def resume(self, node: Node) -> None:
        assert node.proc is not None
        node.proc.send_signal(signal.SIGCONT)

    def cut_off(self, replica: Node) -> None:
        """Cut ``replica`` off its master: freeze it (SIGSTOP), then have the master close
        the replication link (``CLIENT KILL TYPE replica``). What the master writes from
        now on never reaches the replica, even after SIGCONT (SIGSTOP alone only delays it:
        the kernel still takes the bytes into the frozen replica's socket buffer)."""
        master_port = int(str(replica.info("replication")["master_port"]))
        self.pause(replica)
        with self.by_port(master_port).client() as master:
            master.execute_command("CLIENT", "KILL", "TYPE", "replica")
            wait_for(lambda: int(master.info("replication")["connected_slaves"]) == 0, 10,
                     "the master to drop its replica")

    def takeover(self, replica: Node, timeout: float = 30) -> None:
        """Promote ``replica`` now, without its master's agreement (``CLUSTER FAILOVER
        TAKEOVER``: the master may be dead), and wait until the others see it as master."""
        with replica.client() as c:
            c.execute_command("CLUSTER", "FAILOVER", "TAKEOVER")
        wait_for(lambda: replica.role() == "master", timeout, f"{replica.port} to be master")
        wait_for(lambda: all(_sees_master(n, replica) for n in self.live()), timeout,
                 "every node to see the new master", interval=0.1)

    def wait_promoted(self, replica: Node, timeout: float = 30) -> None:
        """Wait until ``replica`` (of a dead master) has been elected master."""
        wait_for(lambda: _role_or_none(replica) == "master", timeout,
                 f"replica {replica.port} to be promoted")

    def restart(self, node: Node) -> None:
        """Start a killed node again from its folder; it rejoins (as a replica of whoever
        took over its slots)."""
        assert not node.alive()
        self._spawn(node)
        wait_for(lambda: _ping(node) or not node.alive(), 10, f"node {node.port} to restart")


def _ping(node: Node) -> bool:
    try:
        with node.client() as c:
            return bool(c.ping())
    except redis.RedisError:
        return False


def _role_or_none(node: Node) -> str | None:
    try:
        return node.role()
    except redis.RedisError:
        return None


def _sees_master(node: Node, master: Node) -> bool:
    try:
        with node.client() as c:
            for line in c.execute_command("CLUSTER", "NODES").decode().splitlines():
                fields = line.split()
                if fields[1].startswith(f"127.0.0.1:{master.port}@"):
                    return "master" in fields[2]
    except redis.RedisError:
        return False
    return False


def wait_ok(cluster: LocalCluster, timeout: float = 60) -> None:
    """Until every live node says ``cluster_state:ok`` (after a failover)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if all(n.cluster_info().get("cluster_state") == "ok" for n in cluster.live()):
                return
        except redis.RedisError:
            pass
        time.sleep(0.1)
    pytest.fail("the cluster did not come back to cluster_state:ok")
