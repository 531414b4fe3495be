"""HTTP ingress of an embedded Ray: HAProxy made safe by default, or Serve's Python proxy.

Ray Serve's HAProxy (``RAY_SERVE_ENABLE_HA_PROXY=1``) is ~3x faster per request than its Python proxy
on 2 cores, but Ray's config template binds its stats page (8404) and Prometheus exporter (9101) on
every interface and opens its admin socket (``level admin``) to every local user (mode 666, in
/tmp/haproxy-serve). ``haproxy_environment`` fixes both without touching Ray: HAProxy is started
through a small wrapper that rewrites those lines of each config Ray renders before HAProxy reads it
(loopback binds, mode 600), and every socket, config and state file goes into a fresh directory only
this user can enter. The stats and metrics ports are free ones picked at start (Ray's fixed defaults
would make a second service on the machine fail).

HAProxy dies with the service however the service dies. Ray's raylet ends a dead worker's children,
but not when the raylet itself is killed (the whole session SIGKILLed, the OOM killer); the wrapper
therefore has the kernel send HAProxy SIGTERM when the process that started it (Serve's HAProxy
manager actor) dies (``PR_SET_PDEATHSIG``, Linux). An HAProxy left over by an older version is found
by ``orphaned_haproxy`` and ended by ``embedpipe serve`` before it binds the port.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import sys
import tempfile
from pathlib import Path

import psutil

PREFIX = "ephap-"  # the private directories haproxy_environment makes; an HAProxy's config lives in one
MANAGER = "ray::HAProxyManager"  # the actor process that starts and owns Serve's HAProxy

# Run by the wrapper between its own start and HAProxy's: asks the kernel for SIGTERM when the parent
# (the thread of the manager actor that started the wrapper) dies, and gives up if it died already.
_PDEATHSIG = (
    "import ctypes, os, signal, sys\n"
    "if sys.platform.startswith('linux'):\n"
    "    if ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0) != 0:\n"
    "        sys.exit('embedpipe haproxy wrapper: prctl(PR_SET_PDEATHSIG) failed')\n"
    "    if os.getppid() != int(sys.argv[1]):\n"
    "        sys.exit('embedpipe haproxy wrapper: the process that started HAProxy is gone')\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)

# sed expressions applied to every config Ray renders: "bind *:8404" and "bind :9101" become loopback
# binds (the frontend's own bind names its host and is left alone); the admin socket becomes private.
_HARDEN = (
    r"s/^\([[:space:]]*bind[[:space:]]\+\)\*:/\1127.0.0.1:/",
    r"s/^\([[:space:]]*bind[[:space:]]\+\):/\1127.0.0.1:/",
    r"s/ mode 666 / mode 600 /",
)


def haproxy_environment(haproxy: str | None = None) -> dict[str, str]:
    """The environment variables under which Ray starts HAProxy loopback-only and private.

    Set them before Ray starts (``embedpipe serve`` does, for its embedded Ray). On a cluster, set the
    same variables on every node before ``ray start``.

    Args:
        haproxy: the real haproxy binary (default: the one on PATH).

    Returns:
        ``RAY_SERVE_HAPROXY_*`` settings: the wrapper binary and the private paths.
    """
    real = haproxy or shutil.which("haproxy")
    if real is None:
        raise FileNotFoundError(
            "serve.ingress is haproxy, but no haproxy binary is on PATH (apt-get install haproxy)."
        )
    # Mode 0700: only this user enters. Short: Ray adds a 56-character node id and HAProxy takes socket
    # paths of at most 97 characters.
    root = Path(tempfile.mkdtemp(prefix=PREFIX, dir="/tmp" if Path("/tmp").is_dir() else None))
    wrapper = root / "haproxy"
    python = shlex.quote(sys.executable)
    expressions = " ".join(f"-e {shlex.quote(e)}" for e in _HARDEN)
    wrapper.write_text(
        "#!/bin/sh\n"
        "# embedpipe: Ray Serve's HAProxy config made loopback-only and private before HAProxy reads it.\n"
        'cfg=""; prev=""\n'
        'for arg in "$@"; do [ "$prev" = "-f" ] && cfg="$arg"; prev="$arg"; done\n'
        f'if [ -n "$cfg" ] && [ -f "$cfg" ]; then sed -i {expressions} "$cfg" || exit 1; fi\n'
        "# HAProxy is ended by the kernel when the process that started it dies (see serve/ingress.py).\n"
        f'exec {python} -I -S -c {shlex.quote(_PDEATHSIG)} "$PPID" {shlex.quote(real)} "$@"\n'
    )
    wrapper.chmod(0o700)
    return {
        # Free ports of their own, so that two services on one machine do not collide on Ray's fixed
        # defaults (8404, 9101).
        "RAY_SERVE_HAPROXY_STATS_PORT": str(_free_port()),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(_free_port()),
        "RAY_SERVE_HAPROXY_BINARY_PATH": str(wrapper),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": str(root / "admin.sock"),
        "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": str(root / "metrics.sock"),
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(root / "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(root),
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(root / "server-state"),
    }


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def orphaned_haproxy(port: int) -> psutil.Process | None:
    """The HAProxy of a dead embedpipe service that listens on ``port``, if one does: this user's
    haproxy, its config in a directory ``haproxy_environment`` made, and no live HAProxy manager among
    its ancestors (the manager of a running service is its parent)."""
    for proc in psutil.process_iter(["name", "cmdline", "uids"]):
        try:
            if proc.info["name"] != "haproxy" or proc.info["uids"].real != os.getuid():
                continue
            config = _config_path(proc.info["cmdline"] or [])
            if config is None or not any(part.startswith(PREFIX) for part in config.parts[:-1]):
                continue
            if not any(
                c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in proc.net_connections("inet")
            ):
                continue
            if any(MANAGER in " ".join(p.cmdline()) for p in proc.parents()):
                continue
            return proc
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return None


def end_orphan(proc: psutil.Process, timeout_s: float = 5.0) -> None:
    """Stop an orphaned HAProxy: SIGTERM, then SIGKILL if it is still there after ``timeout_s``."""
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout_s)
    except psutil.TimeoutExpired:
        proc.kill()
        proc.wait(timeout_s)
    except psutil.NoSuchProcess:
        pass


def _config_path(cmdline: list[str]) -> Path | None:
    for flag, value in zip(cmdline, cmdline[1:], strict=False):
        if flag == "-f":
            return Path(value)
    return None
