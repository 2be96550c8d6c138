"""compute_threads.py: after `configure`, only compute threads run torch multi-threaded; the process
default stays 1, so no other thread starts an OpenMP pool (which throttles the engine's: see the module).
Runs in a fresh interpreter: `configure` changes process-wide torch settings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent(
    """
    import json, threading, torch
    from softserve.engine import compute_threads as ct
    out = {"before": ct.configured()}
    out["threads"] = ct.configure(2)
    torch.randn(200_000).sum()  # main thread work, as model loading does
    out["main"] = torch.get_num_threads()
    seen = {}
    def other():
        torch.randn(200_000).sum()
        seen["other"] = torch.get_num_threads()
    t = threading.Thread(target=other); t.start(); t.join()
    def engine():
        ct.enter_compute_thread()
        torch.randn(200_000).sum()
        seen["compute"] = torch.get_num_threads()
        from softserve.engine import native_kernels as nk
        if nk.load():  # our kernels' first parallel call in this thread must not reset its count to the default
            pool = torch.randn(2, 3, 64, 64)
            nk.decode_attention(torch.randn(2, 6, 64), pool[0], pool[1], torch.tensor([0, 9]), torch.tensor([5, 9]), None, 0.125)
            nk.rms_norm(torch.randn(4, 64), torch.ones(64), 1e-5)
            nk.write_kv(pool[0], pool[1], torch.randn(3, 2, 64), torch.randn(3, 2, 64), torch.tensor([1, 2]))
            torch.randn(200_000).sum()
            seen["compute_after_kernels"] = torch.get_num_threads()
    t = threading.Thread(target=engine); t.start(); t.join()
    out.update(seen)
    out["run_result"] = ct.run_in_compute_thread(lambda a, b: (torch.get_num_threads(), a + b), 2, 3)
    try:
        ct.run_in_compute_thread(lambda: 1 / 0)
    except ZeroDivisionError:
        out["raised"] = True
    out["main_after"] = torch.get_num_threads()
    print(json.dumps(out))
    """
)


@pytest.mark.process
def test_only_compute_threads_get_the_configured_threads():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["before"] is False and out["threads"] == 2
    assert out["main"] == 1 and out["other"] == 1 and out["main_after"] == 1
    assert out["compute"] == 2
    assert out.get("compute_after_kernels", 2) == 2
    assert out["run_result"] == [2, 5]
    assert out["raised"] is True


def test_without_configure_a_compute_thread_is_the_caller():
    from softserve.engine import compute_threads as ct

    if ct.configured():  # another test of this process configured it: nothing to check here
        return
    import threading

    assert ct.run_in_compute_thread(threading.current_thread) is threading.current_thread()
