"""A tuning job survives kill -9 of its server: a restarted server on the same store resumes it from
its last checkpoint, and it ends with the same prompt as an uninterrupted run (same seed), with a
complete, ordered event list. And two replicas on one S3 store never run the same job.

Live servers (tiny model, one torch thread each) are started and stopped by PID (tests/support/live_server.py).
"""

from __future__ import annotations

import time

import httpx
import pytest
from tests.support.live_server import LiveServer, tiny_model_dir
from tests.support.polling import poll_json
from tests.support.tuning import toy_records

pytestmark = pytest.mark.process  # a live server subprocess

STEPS = 300
LEASE_S = 2.0
FAST_LEASE = ["--tuning-lease-seconds", str(LEASE_S), "--tuning-scan-seconds", "0.3", "--max-model-len", "256",
              "--log-level", "warning"]


def _body(name: str) -> dict:
    return {"name": name, "training_data": toy_records(12), "validation_data": toy_records(3), "init": "vocab",
            "num_virtual_tokens": 4, "steps": STEPS, "batch_size": 4, "micro_batch_size": 2, "learning_rate": 0.1,
            "seed": 11, "checkpoint_every": 20, "eval_every": 100}


def wait_for_job(client: httpx.Client, job_id: str, check, timeout: float = 240.0) -> dict:
    return poll_json(client, f"/v1/tuning/jobs/{job_id}", check, timeout, interval=0.02)


def _events(client: httpx.Client, job_id: str) -> list[dict]:
    out, after = [], None
    while True:
        params = {"limit": 1000, "order": "asc"} | ({"after": after} if after else {})
        page = client.get(f"/v1/tuning/jobs/{job_id}/events", params=params).json()
        out += page["data"]
        if not page["has_more"]:
            return out
        after = out[-1]["id"]


def _boto_kwargs(seaweed) -> dict:
    env = seaweed.env()
    return {"aws_access_key_id": env["AWS_ACCESS_KEY_ID"], "aws_secret_access_key": env["AWS_SECRET_ACCESS_KEY"],
            "region_name": env["AWS_REGION"]}


def _finished(job: dict) -> bool:
    return job["status"] in ("succeeded", "failed", "cancelled")


def test_kill9_mid_job_resumes_to_the_same_prompt(tmp_path, tmp_path_factory, tokenizer):
    model = tiny_model_dir(tmp_path_factory, tokenizer)
    store = tmp_path / "store"
    with LiveServer(store, model=model, extra_args=FAST_LEASE, log_dir=tmp_path) as server, server.client() as c:
        ref = c.post("/v1/tuning/jobs", json=_body("reference")).json()
        reference = wait_for_job(c, ref["id"], _finished)
        assert reference["status"] == "succeeded", reference["error"]
        job = c.post("/v1/tuning/jobs", json=_body("crashed")).json()
        # Kill once a checkpoint exists and well before the end.
        running = wait_for_job(c, job["id"], lambda j: j["step"] >= 50 or _finished(j))
        assert not _finished(running), "the job finished before the kill; raise STEPS"
        server.kill9()
    assert running["step"] < STEPS

    with LiveServer(store, model=model, extra_args=FAST_LEASE, log_dir=tmp_path) as server, server.client() as c:
        done = wait_for_job(c, job["id"], _finished)
        events = _events(c, job["id"])
        checkpoints = c.get(f"/v1/tuning/jobs/{job['id']}/checkpoints", params={"limit": 1000}).json()["data"]
    assert done["status"] == "succeeded", done["error"]
    assert done["result_prompt"]["sha256"] == reference["result_prompt"]["sha256"]  # the same prompt, bit for bit
    assert done["resumed"] == 1 and done["step"] == STEPS
    assert [p["loss"] for p in done["loss_curve"]] == [p["loss"] for p in reference["loss_curve"]]
    # Events: complete, ordered, no step twice, one resume from a checkpoint at or before the kill.
    metrics = [e["data"]["step"] for e in events if e["type"] == "metrics"]
    assert metrics == list(range(1, STEPS + 1))
    assert [e["id"] for e in events] == sorted(e["id"] for e in events)
    resumed = [e for e in events if e["message"].startswith("Resumed from the checkpoint at step")]
    assert len(resumed) == 1 and 20 <= resumed[0]["data"]["step"] <= running["step"]
    assert [c["step_number"] for c in checkpoints] == list(range(STEPS, 0, -20))


@pytest.mark.integration
def test_two_replicas_on_one_s3_store_never_run_the_same_job(seaweed, monkeypatch, tmp_path, tmp_path_factory, tokenizer):
    """Jobs submitted to both replicas: each job runs on exactly one replica at a time (its events
    show one start, and a replica killed mid-job is taken over once: one resume), and all finish."""
    import uuid

    for key, value in seaweed.env().items():
        monkeypatch.setenv(key, value)
    model = tiny_model_dir(tmp_path_factory, tokenizer)
    store = f"s3://{seaweed.bucket}/tuning-{uuid.uuid4().hex[:8]}"
    # One tenant's 4 jobs: the per-tenant limit counts every replica's jobs (issue #26 F7), so raise it.
    args = FAST_LEASE + ["--s3-endpoint-url", seaweed.endpoint_url, "--max-tuning-jobs-per-tenant", "4"]
    a = LiveServer(store, model=model, extra_args=args + ["--tuning-replica-id", "replica-a"], log_dir=tmp_path).start()
    b = LiveServer(store, model=model, extra_args=args + ["--tuning-replica-id", "replica-b"], log_dir=tmp_path).start()
    try:
        with a.client() as ca, b.client() as cb:
            ids = []
            for i in range(4):
                r = (ca, cb)[i % 2].post("/v1/tuning/jobs", json={**_body(f"job{i}"), "steps": 60, "checkpoint_every": 10})
                assert r.status_code == 200, r.text
                ids.append(r.json()["id"])
            # Kill replica a while it runs a job (seen through b, i.e. through the store): b must take it over.
            victim = None
            deadline = time.monotonic() + 120
            while victim is None and time.monotonic() < deadline:
                for job_id in ids:
                    job = cb.get(f"/v1/tuning/jobs/{job_id}").json()
                    if job["status"] == "running" and job["replica"] == "replica-a" and job["step"] >= 10:
                        victim = job_id
                        break
                time.sleep(0.05)
            assert victim is not None, "replica a never ran a job"
            a.kill9()
            jobs = [wait_for_job(cb, i, _finished, timeout=300) for i in ids]
            events = {i: _events(cb, i) for i in ids}
    finally:
        a.stop()
        b.stop()
    assert [j["status"] for j in jobs] == ["succeeded"] * 4, [j["error"] for j in jobs]
    for job_id, evs in events.items():
        assert [e["data"]["step"] for e in evs if e["type"] == "metrics"] == list(range(1, 61)), job_id
        runs = [e["data"]["replica"] for e in evs if e["message"].startswith(("Started on", "Resumed from", "Restarted from"))]
        # One run per job; the killed replica's job: its run, then b's (resumed), never both at once.
        if job_id == victim:
            assert runs == ["replica-a", "replica-b"], runs
        else:
            assert len(runs) == 1, (job_id, runs)
    assert {j["replica"] for j in jobs} <= {"replica-a", "replica-b"}
    import boto3  # the jobs really lived in the bucket (not in a local directory)

    s3 = boto3.client("s3", endpoint_url=seaweed.endpoint_url, **_boto_kwargs(seaweed))
    prefix = store.split("/", 3)[3] + "/tenants/default/tuning/jobs/"
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=seaweed.bucket, Prefix=prefix).get("Contents", [])]
    assert {k[len(prefix):].split("/")[0] for k in keys} == set(ids)
