"""`softserve serve` on a prompt store it cannot write exits at once with a clear message (issue #26:
in Docker, a bind-mounted /data owned by root failed with a PermissionError after the model had loaded,
30 s in). The model path does not even exist here: the check comes before anything loads."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from tests.support.live_server import REPO_ROOT

pytestmark = pytest.mark.process  # the CLI as a subprocess


def _as_unprivileged() -> list[str]:
    """Root writes a 0555 directory anyway: run the CLI as uid 1000 in a user namespace (files owned by
    root then look owned by it, so the directory's owner bits apply and no capability overrides them)."""
    if os.geteuid() != 0:
        return []
    unshare = shutil.which("unshare")
    probe = [unshare, "--user", "--map-user=1000", "--map-group=1000", "true"] if unshare else None
    if probe is None or subprocess.run(probe, capture_output=True).returncode != 0:
        pytest.skip("running as root without user namespaces: cannot make a directory read-only for the server")
    return [unshare, "--user", "--map-user=1000", "--map-group=1000"]


@pytest.mark.parametrize("layout", ["read-only store", "read-only parent"])
def test_serve_refuses_a_store_it_cannot_write_before_loading_anything(tmp_path, layout):
    data = tmp_path / "data"
    data.mkdir()
    store = data / "prompts"
    if layout == "read-only store":
        store.mkdir()
        store.chmod(0o555)
    else:  # the store does not exist and cannot be created
        data.chmod(0o555)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SOFTSERVE_")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    try:
        proc = subprocess.run([*_as_unprivileged(), sys.executable, "-m", "softserve", "serve", "--port", "0",
                               "--store", str(store), "--model", str(tmp_path / "no-such-model")],
                              capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)
    finally:
        data.chmod(0o755)
        if store.exists():
            store.chmod(0o755)
    assert proc.returncode != 0
    assert "is not writable" in proc.stderr and "chown -R 10001:10001" in proc.stderr, proc.stderr
    assert str(store) in proc.stderr
    assert "listening" not in proc.stdout  # refused before binding a port or loading a model
