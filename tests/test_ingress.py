"""HAProxy made safe by default: the wrapper Ray starts instead of haproxy rewrites each config Ray renders
(stats and Prometheus ports on loopback, admin socket mode 600) and every path lives in a private dir."""

import os
import stat
import subprocess

from serve.ingress import haproxy_environment

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
