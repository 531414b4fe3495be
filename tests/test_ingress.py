"""HAProxy made safe by default: the wrapper Ray starts instead of haproxy rewrites each config Ray renders
(stats and Prometheus ports on loopback, admin socket mode 600) and every path lives in a private dir."""

import contextlib
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import requests
import typer

from pipelines.cli import _check_port_free
from serve.ingress import _free_port, haproxy_environment, orphaned_haproxy
from tests.helpers import wait_for

RAY_TEMPLATE_LINES = """global
    stats socket {sock} mode 666 level admin expose-fd listeners
frontend prometheus
    bind :9101
frontend http_frontend
    bind 0.0.0.0:8000
listen stats
  bind *:8404
"""


def test_the_wrapper_binds_loopback_and_keeps_the_admin_socket_private(tmp_path):
    env = haproxy_environment(haproxy="/bin/true")  # the real binary is only exec'd after the rewrite
    root = os.path.dirname(env["RAY_SERVE_HAPROXY_SOCKET_PATH"])
    assert stat.S_IMODE(os.stat(root).st_mode) == 0o700
    paths = {k: v for k, v in env.items() if not k.endswith("_PORT")}
    assert len(paths) == 6 and all(v.startswith(root) for v in paths.values())
    # Ports of its own: two services on one machine do not collide on Ray's fixed 8404 and 9101.
    ports = {int(env["RAY_SERVE_HAPROXY_STATS_PORT"]), int(env["RAY_SERVE_HAPROXY_METRICS_PORT"])}
    assert len(ports) == 2 and not ports & {8404, 9101}
    # Ray adds a 56-character node id; HAProxy takes socket paths up to 97 characters.
    assert len(env["RAY_SERVE_HAPROXY_SOCKET_PATH"]) + 57 <= 97

    config = tmp_path / "haproxy.cfg"
    config.write_text(RAY_TEMPLATE_LINES.format(sock=env["RAY_SERVE_HAPROXY_SOCKET_PATH"]))
    run = subprocess.run([env["RAY_SERVE_HAPROXY_BINARY_PATH"], "-db", "-f", str(config), "-dR"], check=False)
    assert run.returncode == 0
    text = config.read_text()
    assert "bind 127.0.0.1:9101" in text and "bind 127.0.0.1:8404" in text
    assert "bind 0.0.0.0:8000" in text  # the frontend keeps the address the user chose
    assert " mode 600 level admin" in text and "mode 666" not in text


FAKE_HAPROXY = "#!/bin/sh\nexec sleep 120\n"


def test_the_wrapper_has_the_kernel_end_haproxy_when_its_parent_dies(tmp_path):
    """The parent (Serve's HAProxy manager actor) SIGKILLed: HAProxy gets SIGTERM from the kernel."""
    fake = tmp_path / "haproxy-bin"
    fake.write_text(FAKE_HAPROXY)
    fake.chmod(0o700)
    env = haproxy_environment(haproxy=str(fake))
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, env["RAY_SERVE_HAPROXY_BINARY_PATH"]],
        stdout=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    child = psutil.Process(int(parent.stdout.readline()))
    try:
        assert wait_for(lambda: "sleep" in child.name(), 10)  # the wrapper exec'd the binary
        assert child.ppid() == parent.pid
        parent.kill()
        parent.wait()
        assert wait_for(lambda: not _alive(child), 5), "HAProxy outlived the process that started it"
    finally:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()


PARENT = """
import subprocess, sys, time
proc = subprocess.Popen([sys.argv[1], "-db", "-f", "/nonexistent.cfg"])
print(proc.pid, flush=True)
time.sleep(120)
"""


def test_an_orphaned_haproxy_of_a_dead_service_is_found_and_no_other(tmp_path):
    """orphaned_haproxy picks only this user's haproxy, config in an ephap- dir, no live manager."""
    haproxy = _need_haproxy()
    port = _free_port()
    theirs = tmp_path / "haproxy.cfg"  # the same listener from a config that is not ours
    mine = Path(tempfile.mkdtemp(prefix="ephap-", dir=tmp_path)) / "node" / "haproxy.cfg"
    mine.parent.mkdir()
    for cfg in (theirs, mine):
        cfg.write_text(f"defaults\n  mode http\n  timeout client 1s\nfrontend f\n  bind 127.0.0.1:{port}\n")
    stray = subprocess.Popen([haproxy, "-db", "-f", str(theirs)], start_new_session=True)
    try:
        assert wait_for(lambda: not _port_free(port), 10)
        assert orphaned_haproxy(port) is None  # someone else's HAProxy is left alone
    finally:
        stray.kill()
        stray.wait()
    orphan = subprocess.Popen([haproxy, "-db", "-f", str(mine)], start_new_session=True)
    try:
        assert wait_for(lambda: not _port_free(port), 10)
        found = orphaned_haproxy(port)
        assert found is not None and found.pid == orphan.pid
        assert orphaned_haproxy(_free_port()) is None  # not on another port
        _check_port_free("127.0.0.1", port)  # embedpipe serve's check ends it rather than fail
        assert orphan.wait(5) is not None and _port_free(port)
        stray = subprocess.Popen([haproxy, "-db", "-f", str(theirs)], start_new_session=True)
        assert wait_for(lambda: not _port_free(port), 10)
        with pytest.raises(typer.Exit):  # anyone else's listener: the one-line error
            _check_port_free("127.0.0.1", port)
        assert stray.poll() is None
    finally:
        for proc in (orphan, stray):
            proc.kill()
            proc.wait()


MODEL = "sentence-transformers/all-MiniLM-L6-v2"


@pytest.mark.slow
@pytest.mark.parametrize("victim", ["cli", "session", "haproxy-manager", "proxy-actor"])
def test_haproxy_dies_with_its_service(tmp_path, victim):
    """`embedpipe serve` with HAProxy, then SIGKILL of: the CLI; every process of the service but
    HAProxy at once (the raylet that would end its workers' children among them, as the OOM killer or
    a container runtime does); the HAProxy manager actor that started it; Serve's proxy actor.
    No HAProxy of the service is left within a few seconds and the port is free, or, while the
    service lives on, a new HAProxy answers on it."""
    _need_haproxy()
    db = _tiny_db(tmp_path / "db")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "EMBEDPIPE_API_KEY")}
    env.update(HF_HUB_OFFLINE="1")
    log = (tmp_path / "serve.log").open("w")
    embedpipe = str(Path(sys.executable).parent / "embedpipe")
    cli = subprocess.Popen(
        [embedpipe, "serve", "--db", str(db), "--port", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    tree, service_dir = psutil.Process(cli.pid), None
    try:
        assert wait_for(lambda: _healthy(url) or cli.poll() is not None, 240) and cli.poll() is None, _tail(
            tmp_path
        )
        (old,) = [p for p in tree.children(recursive=True) if p.name() == "haproxy"]
        config = Path(old.cmdline()[old.cmdline().index("-f") + 1])
        service_dir = next(p for p in config.parents if p.name.startswith("ephap-"))
        manager = old.parent()
        assert "ray::HAProxyManager" in " ".join(manager.cmdline())
        if victim == "cli":
            cli.kill()
        elif victim == "session":
            for proc in [tree, *tree.children(recursive=True)]:
                if proc.pid != old.pid:
                    with contextlib.suppress(psutil.NoSuchProcess):
                        proc.kill()
        elif victim == "haproxy-manager":
            manager.kill()
        else:
            (proxy,) = [
                p for p in tree.children(recursive=True) if "ray::ProxyActor" in " ".join(p.cmdline())
            ]
            proxy.kill()
        started = time.monotonic()
        gone = wait_for(lambda: not _alive(old), 10)
        state = "gone" if gone else "still there"
        print(f"{victim}: the old HAProxy {state} {time.monotonic() - started:.2f} s after the kill")
        if victim in ("cli", "session"):
            assert gone, "an HAProxy of a dead service is left"
            assert wait_for(lambda: not [p for p in _haproxies(service_dir) if _alive(p)], 10)
            assert wait_for(lambda: _port_free(port), 10), "the port is still held"
        else:
            # The service lives on: its HAProxy is ended with the manager and started again by
            # Serve, or stays when the manager lives; either way the service answers on its port.
            assert gone or _alive(old) and victim == "proxy-actor"
            assert wait_for(lambda: _healthy(url), 120), _tail(tmp_path)
            cli.send_signal(signal.SIGTERM)
            assert cli.wait(60) is not None
            assert wait_for(lambda: _port_free(port), 10)
            assert wait_for(lambda: not [p for p in _haproxies(service_dir) if _alive(p)], 10)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(cli.pid, signal.SIGKILL)
        for proc in _haproxies(service_dir):
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        log.close()


def _need_haproxy() -> str:
    """The haproxy binary, or a skip (a failure under CI, whose .ci/run installs it)."""
    found = shutil.which("haproxy")
    if found is None:
        reason = "needs the haproxy binary (apt-get install haproxy)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI is set, so this fails instead of skipping")
        pytest.skip(reason)
    return found


def _tiny_db(path: Path) -> Path:
    import lancedb
    import numpy as np
    import pyarrow as pa

    from pipelines import store

    store.init_db(path, store.Manifest(shards=1, model=MODEL, dim=384))
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(20, 384)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = [f"d{i}" for i in range(20)]
    table = pa.table({
        "chunk_id": [f"{d}#0" for d in ids], "doc_id": ids, "chunk_index": pa.array([0] * 20, pa.int32()),
        "title": ids, "text": [f"text {i}" for i in range(20)],
        "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), 384),
        "n_tokens": pa.array([2] * 20, pa.int32()), "char_start": pa.array([0] * 20, pa.int32()),
        "char_end": pa.array([6] * 20, pa.int32()), "source": ["t"] * 20, "content_hash": ids,
        "metadata": ["{}"] * 20, "model": [MODEL] * 20, "run_id": ["r"] * 20,
    })  # fmt: skip
    lancedb.connect(str(path)).open_table(store.shard_name(0)).add(table.cast(store.table_schema(384)))
    return path


def _haproxies(service_dir: Path | None) -> list[psutil.Process]:
    """The HAProxy processes whose config lives in the service's private directory."""
    if service_dir is None:
        return []
    found = []
    for proc in psutil.process_iter(["name", "cmdline"]):
        if proc.info["name"] == "haproxy" and any(str(service_dir) in a for a in proc.info["cmdline"] or []):
            found.append(proc)
    return found


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _healthy(url: str) -> bool:
    try:
        return requests.get(f"{url}/healthz", timeout=2).status_code == 200
    except requests.RequestException:
        return False


def _port_free(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _tail(tmp_path: Path) -> str:
    return (tmp_path / "serve.log").read_text()[-3000:]
