"""Two replicas on one real S3 prompt store (SeaweedFS) behind nginx with prompt affinity
(deploy/nginx.conf, upstreams and listen port substituted), all on free 127.0.0.1 ports.

Upload through replica A, infer through nginx and through B, update through B, delete through nginx:
every replica follows within the revalidation window. Then kill A: traffic keeps flowing through
nginx to B. Every process is started here and stopped by its PID.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest

from tests.support.live_server import TINY_HIDDEN, tiny_model_dir
from tests.support.s3_server import free_port
from tests.support.nginx import nginx_conf
from tests.support.processes import http_probe, stop_process, wait_until_ready

pytestmark = [pytest.mark.integration, pytest.mark.process]

REPO = Path(__file__).resolve().parents[2]
REVALIDATE_S = 1.0
READY_TIMEOUT_S = 180.0


def nginx_binary() -> str | None:
    return shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.path.exists(p)), None)


# ---- processes ------------------------------------------------------------------------------------


class Proc:
    """A subprocess with its output in a file, stopped by PID."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> None:
        stop_process(self.proc, sig, timeout)

    def kill9(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)

    def logs(self, tail: int = 3000) -> str:
        try:
            return f"--- {self.name} ---\n" + self.log_path.read_text(errors="replace")[-tail:]
        except FileNotFoundError:
            return ""


def wait_http(url: str, proc: Proc, timeout: float = READY_TIMEOUT_S) -> None:
    with httpx.Client(timeout=2.0) as c:
        wait_until_ready(http_probe(c, url), proc.proc, proc.name, proc.logs, timeout, interval=0.2)


# ---- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, tokenizer) -> Path:
    return tiny_model_dir(tmp_path_factory, tokenizer)


@pytest.fixture(scope="module")
def cluster(seaweed, tiny_model, tmp_path_factory):
    nginx = nginx_binary()
    if nginx is None:
        pytest.skip("nginx not installed (apt-get install nginx-light); .ci/run installs it")
    work = tmp_path_factory.mktemp("cluster")
    store = f"s3://{seaweed.bucket}/replicas-{uuid.uuid4().hex[:10]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SOFTSERVE_", "AWS_"))}
    env.update(seaweed.env())
    env.update(PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1")
    procs: dict[str, Proc] = {}
    urls: dict[str, str] = {}
    try:
        for name in ("a", "b"):
            port = free_port()
            cmd = [sys.executable, "-m", "softserve", "serve", "--host", "127.0.0.1", "--port", str(port),
                   "--model", str(tiny_model), "--store", store, "--s3-endpoint-url", seaweed.endpoint_url,
                   "--store-revalidate-seconds", str(REVALIDATE_S), "--max-model-len", "256",
                   "--max-batch-size", "4", "--log-level", "warning"]
            procs[name] = Proc(f"replica-{name}", cmd, env, work)
            urls[name] = f"http://127.0.0.1:{port}"
        for name in ("a", "b"):
            wait_http(urls[name] + "/ready", procs[name])
        ports = [int(urls[n].rsplit(":", 1)[1]) for n in ("a", "b")]
        nginx_port = free_port()
        prefix = work / "nginx"
        prefix.mkdir()
        conf_path = prefix / "nginx.conf"
        conf_path.write_text(nginx_conf(ports, nginx_port, prefix))
        # -e: the start-up error log, before the config is read (the default path is root-only).
        base = [nginx, "-e", str(prefix / "error.log"), "-c", str(conf_path), "-p", str(prefix)]
        check = subprocess.run(base + ["-t"], capture_output=True, text=True)
        assert check.returncode == 0, check.stderr
        procs["nginx"] = Proc("nginx", base, env, work)
        urls["nginx"] = f"http://127.0.0.1:{nginx_port}"
        wait_http(urls["nginx"] + "/nginx-health", procs["nginx"], timeout=30)
        yield {"urls": urls, "procs": procs, "store": store, "work": work}
    finally:
        for p in procs.values():
            p.stop()  # nginx: SIGTERM to its master PID, which stops its own workers


# ---- helpers --------------------------------------------------------------------------------------


def prompt_bytes(seed: int, k: int = 4) -> bytes:
    import torch
    from safetensors.torch import save as st_save

    t = torch.randn(k, TINY_HIDDEN, generator=torch.Generator().manual_seed(seed))
    return st_save({"prompt_embeddings": t}, metadata={"format": "pt"})


def upload(url: str, name: str, seed: int) -> dict:
    files = {"adapter_model": ("adapter_model.safetensors", prompt_bytes(seed), "application/octet-stream")}
    r = httpx.put(f"{url}/v1/prompts/{name}", files=files, timeout=60)
    assert r.status_code == 201, r.text
    return r.json()


def complete(url: str, model: str, *, prompt: str = "The capital of France is", timeout: float = 60) -> httpx.Response:
    body = {"model": model, "prompt": prompt, "max_tokens": 6, "temperature": 0}
    return httpx.post(f"{url}/v1/completions", json=body, headers={"X-Softserve-Prompt": model}, timeout=timeout)


def eventually(check, what: str, window: float = REVALIDATE_S + 3.0):
    """Poll until check() is truthy; fail if it takes longer than the revalidation window + slack."""
    start = time.monotonic()
    last = None
    while time.monotonic() - start < window:
        last = check()
        if last:
            return time.monotonic() - start
        time.sleep(0.05)
    raise AssertionError(f"{what}: not within {window:.1f} s (last: {last!r})")


def prompt_version(url: str, name: str) -> str | None:
    r = httpx.get(f"{url}/v1/prompts/{name}", timeout=10)
    return r.json().get("version") if r.status_code == 200 else None


# ---- the scenario ---------------------------------------------------------------------------------


def test_replicas_share_store_follow_changes_and_fail_over(cluster):
    urls, procs = cluster["urls"], cluster["procs"]
    a, b, lb = urls["a"], urls["b"], urls["nginx"]

    # Both replicas first learn that the name does not exist (the miss is cached too).
    for u in (a, b):
        assert complete(u, "greeter").status_code == 404

    # 1. Upload through A; B and nginx follow within the window; all answer the same text.
    v1 = upload(a, "greeter", seed=1)["version"]
    assert complete(a, "greeter").status_code == 200  # read-your-writes on A
    eventually(lambda: complete(b, "greeter").status_code == 200, "B sees the upload")
    eventually(lambda: complete(lb, "greeter").status_code == 200, "nginx path sees the upload")
    texts = {u: complete(u, "greeter").json()["choices"][0]["text"] for u in (a, b, lb)}
    assert len(set(texts.values())) == 1, texts  # same weights, same prompt, greedy

    # Streaming through nginx is not buffered into one chunk.
    body = {"model": "greeter", "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{lb}/v1/completions", json=body, headers={"X-Softserve-Prompt": "greeter"},
                      timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line.startswith("data:")]
    assert events[-1].strip() == "data: [DONE]" and len(events) >= 3

    # 2. Update through B: A follows within the window.
    v2 = upload(b, "greeter", seed=2)["version"]
    assert v2 != v1 and prompt_version(b, "greeter") == v2
    eventually(lambda: prompt_version(a, "greeter") == v2, "A sees the update")
    eventually(lambda: prompt_version(lb, "greeter") == v2, "nginx path sees the update")
    pinned = complete(a, f"greeter@{v1}")
    assert pinned.status_code == 200, pinned.text  # the old version stays addressable

    # 3. Delete through nginx: both replicas follow.
    r = httpx.delete(f"{lb}/v1/prompts/greeter", timeout=30)
    assert r.status_code == 200, r.text
    for u in (a, b):
        eventually(lambda u=u: complete(u, "greeter").status_code == 404, f"{u} sees the delete")
        eventually(lambda u=u: complete(u, f"greeter@{v1}").status_code == 404, f"{u} drops pinned versions")

    # 4. Affinity: the same header always lands on the same replica (nginx access log). Add names
    #    until the ring has put some on each replica (ports, hence the ring, differ per run).
    port_a, port_b = a.rsplit(":", 1)[1], b.rsplit(":", 1)[1]
    access_log = cluster["work"] / "nginx" / "access.log"

    def routes() -> dict[str, set[str]]:
        by_prompt: dict[str, set[str]] = {}
        for line in access_log.read_text().splitlines():
            m = re.search(r'POST /v1/completions[^"]*" 200 .*prompt="(p\d+)" upstream=(.+?) upstream_status=', line)
            if m:  # after a failover: "A:port, B:port" -- the last one answered
                served = m.group(2).split(",")[-1].strip()
                by_prompt.setdefault(m.group(1), set()).add(served.rsplit(":", 1)[1])
        return by_prompt

    names: list[str] = []
    for i in range(16):
        names.append(f"p{i}")
        upload(a, names[-1], seed=10 + i)
        eventually(lambda n=names[-1]: complete(lb, n).status_code == 200, f"{names[-1]} visible via nginx")
        for _ in range(2):
            assert complete(lb, names[-1]).status_code == 200
        time.sleep(0.05)  # access log line written
        used = set().union(*routes().values())
        if len(names) >= 4 and used == {port_a, port_b}:
            break
    by_prompt = routes()
    assert set(by_prompt) == set(names)
    assert all(len(ups) == 1 for ups in by_prompt.values()), by_prompt  # affinity
    on_a = [n for n, ups in by_prompt.items() if ups == {port_a}]
    assert on_a and len(on_a) < len(names), by_prompt  # both replicas got prompts

    # 5. Kill A (SIGKILL, like a crashed pod): nginx fails over to B for every prompt, including
    #    those whose hash points at A.
    procs["a"].kill9()
    for name in names:
        for _ in range(2):
            r = complete(lb, name)
            assert r.status_code == 200, (r.status_code, r.text, procs["nginx"].logs())
    after = routes()
    assert all(after[n] == {port_a, port_b} for n in on_a), after  # A's prompts now answered by B
    r = httpx.get(f"{lb}/v1/models", timeout=30)
    assert r.status_code == 200 and set(names) <= {m["id"] for m in r.json()["data"]}
    # Uploads keep working through the router too.
    v5 = upload(lb, "after-failover", seed=99)["version"]
    assert prompt_version(b, "after-failover") == v5
