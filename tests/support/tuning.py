"""Tuning test helpers: a toy labelled dataset, and waiting for a job over the API."""

from __future__ import annotations

import time

from softserve.tuning.data import parse_records, tokenize_examples

WORDS = "apple river stone cloud tiger lemon violin candle forest mirror pepper rocket".split()


def toy_records(n: int = 12, answer=lambda i: " yes" if i % 2 else " no") -> list[dict]:
    return [{"prompt": f"Word: {WORDS[i % len(WORDS)]}\nLabel:", "completion": answer(i)} for i in range(n)]


def toy_data(tokenizer, n: int = 12, **kw):
    return tokenize_examples(tokenizer, parse_records(toy_records(n, **kw)))


def wait_for_job(client, job_id, headers, statuses, timeout=40.0, until=lambda job: True):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/tuning/jobs/{job_id}", headers=headers).json()
        if job["status"] in statuses and until(job):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} still {job['status']} (step {job['step']}) after {timeout}s")
