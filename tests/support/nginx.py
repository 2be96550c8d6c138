"""deploy/nginx.conf adapted to run under a test: local upstreams, a loopback listener, files in a temp dir."""

from __future__ import annotations

import os
import re
from pathlib import Path

from tests.support import REPO_ROOT as REPO


def nginx_conf(upstream_ports: list[int], listen_port: int, prefix: Path) -> str:
    """deploy/nginx.conf with local upstreams, a loopback listener and files under `prefix`."""
    conf = (REPO / "deploy" / "nginx.conf").read_text()
    servers = "".join(f"        server 127.0.0.1:{p} max_fails=1 fail_timeout=5s;\n" for p in upstream_ports)
    conf, n = re.subn(r"(?m)^\s*server softserve-\d+:8000[^\n]*\n", "", conf)
    assert n >= 2, "deploy/nginx.conf: expected the softserve-N upstream servers"
    conf = conf.replace("        keepalive 32;\n", servers + "        keepalive 32;\n", 1)
    conf, n = re.subn(r"(?m)^(\s*)listen 8080;", rf"\1listen 127.0.0.1:{listen_port};", conf)
    assert n == 1
    conf = conf.replace("access_log /dev/stdout softserve;", f"access_log {prefix / 'access.log'} softserve;")
    for d in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (prefix / d).mkdir(parents=True, exist_ok=True)
    temp_paths = "".join(f"    {d}_temp_path {prefix / d};\n" for d in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    conf = conf.replace("http {\n", "http {\n" + temp_paths, 1)
    head = f"pid {prefix / 'nginx.pid'};\nerror_log {prefix / 'error.log'} info;\ndaemon off;\n"
    if os.geteuid() == 0:
        head += "user root;\n"  # workers must reach the temp paths under pytest's private tmp dirs
    conf = conf.replace("worker_processes auto;", "worker_processes 1;")
    return head + conf
