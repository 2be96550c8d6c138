"""The Batch API against live servers (tiny model, subprocesses stopped by PID): the official `openai`
SDK end to end, kill -9 mid-batch, and two replicas on one SeaweedFS store running each batch once."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid

import httpx
import pytest

from tests.batch.conftest import completion_line, jsonl
from tests.support.live_server import LiveServer, tiny_model_dir
from tests.support.polling import poll_json

pytestmark = pytest.mark.process  # live server subprocesses

FAST = ["--batch-flush-seconds", "0.2", "--batch-scan-seconds", "0.3", "--batch-lease-seconds", "2",
        "--max-model-len", "256", "--log-level", "warning"]


def _create(c: httpx.Client, lines: list[dict]) -> dict:
    file_id = c.post("/v1/files", files={"file": ("in.jsonl", jsonl(lines))}, data={"purpose": "batch"}).json()["id"]
    resp = c.post("/v1/batches", json={"input_file_id": file_id, "endpoint": "/v1/completions", "completion_window": "24h"})
    assert resp.status_code == 200, resp.text
    return resp.json()


def _done(batch: dict) -> bool:
    return batch["status"] in ("completed", "failed", "cancelled", "expired")


def _output(c: httpx.Client, batch: dict) -> list[dict]:
    return [json.loads(line) for line in c.get(f"/v1/files/{batch['output_file_id']}/content").text.splitlines()]


def test_openai_sdk_creates_polls_lists_cancels_and_downloads(tmp_path, tmp_path_factory, tokenizer):
    openai = pytest.importorskip("openai")
    model = tiny_model_dir(tmp_path_factory, tokenizer)
    with LiveServer(tmp_path / "store", model=model, extra_args=FAST, log_dir=tmp_path) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
        served = client.models.list().data[0].id
        lines = [completion_line(f"t-{i}", f"Ticket {i}: my order never arrived", max_tokens=4, model=served)
                 for i in range(20)]
        uploaded = client.files.create(file=("tickets.jsonl", jsonl(lines)), purpose="batch")
        assert uploaded.purpose == "batch" and uploaded.bytes == len(jsonl(lines))
        batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/completions",
                                      completion_window="24h", metadata={"run": "sdk"})
        assert batch.status == "validating" and batch.metadata == {"run": "sdk"}
        deadline = time.monotonic() + 120
        while batch.status not in ("completed", "failed", "cancelled", "expired"):
            assert time.monotonic() < deadline, batch
            time.sleep(0.1)
            batch = client.batches.retrieve(batch.id)
        assert batch.status == "completed" and batch.error_file_id is None
        assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (20, 20, 0)
        out = [json.loads(line) for line in client.files.content(batch.output_file_id).text.splitlines()]
        assert [o["custom_id"] for o in out] == [f"t-{i}" for i in range(20)]
        for line, o in zip(lines, out):
            solo = client.completions.create(**line["body"])
            assert o["response"]["body"]["choices"][0]["text"] == solo.choices[0].text
        assert client.files.retrieve(batch.output_file_id).purpose == "batch_output"
        assert batch.id in [b.id for b in client.batches.list(limit=10)]
        slow = [completion_line(f"s-{i}", "Hi", max_tokens=100, ignore_eos=True, model=served) for i in range(200)]
        second = client.batches.create(input_file_id=client.files.create(file=("slow.jsonl", jsonl(slow)), purpose="batch").id,
                                       endpoint="/v1/completions", completion_window="24h")
        cancelled = client.batches.cancel(second.id)
        assert cancelled.status in ("cancelling", "cancelled")
        while cancelled.status != "cancelled":
            assert time.monotonic() < deadline + 60, cancelled
            time.sleep(0.1)
            cancelled = client.batches.retrieve(second.id)
        assert cancelled.request_counts.completed < 200
        with pytest.raises(openai.NotFoundError):
            client.batches.retrieve("batch_" + "0" * 24)
        # The same through our typed client and the CLI.
        from softserve.client import Client, NotFoundError

        with Client(server.url, api_key="unused") as ss:
            ours = ss.batches.wait(ss.batches.create(jsonl(lines[:5]), metadata={"via": "client"}).id, poll_interval=0.1)
            assert ours.status == "completed" and ours.request_counts.completed == 5 and ours.runs[0].from_line == 0
            assert [json.loads(x)["custom_id"] for x in ss.batches.content(ours.output_file_id).splitlines()] == \
                [f"t-{i}" for i in range(5)]
            assert ours.id in [b.id for b in ss.batches.list(page_size=1)]  # every page
            with pytest.raises(NotFoundError):
                ss.batches.get("batch_" + "0" * 24)
        (tmp_path / "cli.jsonl").write_bytes(jsonl(lines[:3]))
        cli = [sys.executable, "-m", "softserve", "batches", "--url", server.url]
        made = subprocess.run(cli + ["create", "-i", str(tmp_path / "cli.jsonl"), "--wait", "--poll-interval", "0.2"],
                              capture_output=True, text=True, timeout=120, check=True)
        batch_id = json.loads(made.stdout)["id"]
        assert json.loads(made.stdout)["status"] == "completed"
        listed = subprocess.run(cli + ["list"], capture_output=True, text=True, timeout=60, check=True).stdout
        assert f"{batch_id}  completed   3/3 done, 0 failed" in listed
        subprocess.run(cli + ["download", batch_id, "-o", str(tmp_path / "cli-out.jsonl")], capture_output=True,
                       text=True, timeout=60, check=True)
        assert [json.loads(x)["custom_id"] for x in (tmp_path / "cli-out.jsonl").read_text().splitlines()] == ["t-0", "t-1", "t-2"]
        gone = subprocess.run(cli + ["get", "batch_" + "0" * 24], capture_output=True, text=True, timeout=60)
        assert gone.returncode != 0 and "error 404" in gone.stderr


def test_kill9_mid_batch_loses_and_repeats_no_line(tmp_path, tmp_path_factory, tokenizer):
    model = tiny_model_dir(tmp_path_factory, tokenizer)
    store = tmp_path / "store"
    args = FAST + ["--max-batch-size", "4", "--tuning-replica-id", "pod-0"]  # a restarted pod takes its own lease back
    lines = [completion_line(f"row-{i}", f"Row {i} of the catalogue", max_tokens=40, ignore_eos=True, model="tiny")
             for i in range(240)]
    with LiveServer(store, model=model, extra_args=args + ["--served-model-name", "tiny"], log_dir=tmp_path) as server, \
            server.client() as c:
        batch = _create(c, lines)
        running = poll_json(c, f"/v1/batches/{batch['id']}", lambda b: b["request_counts"]["completed"] >= 24 or _done(b), 300)
        assert not _done(running), "the batch finished before the kill; make it longer"
        server.kill9()
    seen = running["request_counts"]["completed"]
    with LiveServer(store, model=model, extra_args=args + ["--served-model-name", "tiny"], log_dir=tmp_path) as server, \
            server.client() as c:
        done = poll_json(c, f"/v1/batches/{batch['id']}", _done, 300)
        out = _output(c, done)
        solo = [c.post("/v1/completions", json=lines[i]["body"]).json()["choices"][0]["text"] for i in (0, 239)]
    assert done["status"] == "completed" and done["request_counts"] == {"total": 240, "completed": 240, "failed": 0}
    assert [o["custom_id"] for o in out] == [f"row-{i}" for i in range(240)]  # every line once, in input order
    assert [out[0]["response"]["body"]["choices"][0]["text"], out[-1]["response"]["body"]["choices"][0]["text"]] == solo
    runs = done["runs"]
    assert [r["replica"] for r in runs] == ["pod-0", "pod-0"] and runs[0]["from_line"] == 0
    assert seen <= runs[1]["from_line"] < 240  # resumed after what was committed: no finished line redone


@pytest.mark.integration
def test_two_replicas_on_one_s3_store_run_each_batch_once(seaweed, monkeypatch, tmp_path, tmp_path_factory, tokenizer):
    for key, value in seaweed.env().items():
        monkeypatch.setenv(key, value)
    model = tiny_model_dir(tmp_path_factory, tokenizer)
    store = f"s3://{seaweed.bucket}/batches-{uuid.uuid4().hex[:8]}"
    args = FAST + ["--s3-endpoint-url", seaweed.endpoint_url, "--max-batch-size", "4", "--served-model-name", "tiny"]
    a = LiveServer(store, model=model, extra_args=args + ["--tuning-replica-id", "replica-a"], log_dir=tmp_path).start()
    b = LiveServer(store, model=model, extra_args=args + ["--tuning-replica-id", "replica-b"], log_dir=tmp_path).start()
    try:
        with a.client() as ca, b.client() as cb:
            batches = [_create((ca, cb)[i % 2], [completion_line(f"b{i}-{j}", f"Item {j}", max_tokens=30, ignore_eos=True,
                                                                 model="tiny") for j in range(120)]) for i in range(3)]
            # Kill replica a while it runs a batch (seen through b, i.e. through the store): b takes it over.
            victim = None
            deadline = time.monotonic() + 120
            while victim is None and time.monotonic() < deadline:
                for batch in batches:
                    now = cb.get(f"/v1/batches/{batch['id']}").json()
                    if now["runs"] and now["runs"][-1]["replica"] == "replica-a" and now["request_counts"]["completed"] >= 8 \
                            and not _done(now):
                        victim = now
                        break
                time.sleep(0.05)
            assert victim is not None, "replica a never ran a batch"
            a.kill9()
            finished = [poll_json(cb, f"/v1/batches/{batch['id']}", _done, 300) for batch in batches]
            outputs = [_output(cb, batch) for batch in finished]
    finally:
        a.stop()
        b.stop()
    for i, (batch, out) in enumerate(zip(finished, outputs)):
        assert batch["status"] == "completed" and batch["request_counts"]["completed"] == 120
        assert [o["custom_id"] for o in out] == [f"b{i}-{j}" for j in range(120)]  # exactly once each, in order
        replicas = [r["replica"] for r in batch["runs"]]
        # One run per replica that held it: a batch a ran when it died is taken over by b once; a batch b
        # took up runs there only. Never two runs of the live replica, never a after b.
        assert replicas in (["replica-a"], ["replica-b"], ["replica-a", "replica-b"]), batch["runs"]
        if batch["id"] == victim["id"]:
            assert replicas == ["replica-a", "replica-b"], batch["runs"]
            assert batch["runs"][1]["from_line"] >= victim["request_counts"]["completed"]
