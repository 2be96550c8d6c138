"""Tuning test helpers: a toy labelled dataset, waiting for a job over the API, a manager on a local
store and a toy job submitted to it directly."""

from __future__ import annotations

import json

from softserve.tuning.data import parse_records, tokenize_examples
from tests.support.polling import poll_json

WORDS = "apple river stone cloud tiger lemon violin candle forest mirror pepper rocket".split()


def toy_records(n: int = 12, answer=lambda i: " yes" if i % 2 else " no") -> list[dict]:
    return [{"prompt": f"Word: {WORDS[i % len(WORDS)]}\nLabel:", "completion": answer(i)} for i in range(n)]


def toy_data(tokenizer, n: int = 12, **kw):
    return tokenize_examples(tokenizer, parse_records(toy_records(n, **kw)))


def wait_for_job(client, job_id, headers, statuses, timeout=40.0, until=lambda job: True):
    return poll_json(client, f"/v1/tuning/jobs/{job_id}", lambda job: job["status"] in statuses and until(job), timeout,
                     headers=headers)


def local_manager(model, tokenizer, root, **kw):
    """A TuningManager on a LocalBackend at `root` (two on one root act as two replicas)."""
    from softserve.store.backends import LocalBackend
    from softserve.store.store import PromptStore
    from softserve.tuning.export import model_info
    from softserve.tuning.jobs import TuningManager

    store = PromptStore(LocalBackend(root), model_info(model, "tiny"), revalidate_seconds=0)
    return TuningManager(model, tokenizer, store, model_name="tiny", scan_seconds=0.05, **kw)


def submit_toy_job(manager, steps: int, tenant: str = "acme") -> str:
    """Submit a 10-example job straight to a manager; returns its id."""
    from softserve.tuning.job import new_job_id
    from softserve.tuning.records import new_record
    from softserve.tuning.trainer import TuningConfig

    cfg = TuningConfig(num_virtual_tokens=3, init="vocab", steps=steps, batch_size=4, micro_batch_size=2,
                       learning_rate=0.1, seed=9, max_length=200)
    record = new_record(job_id=new_job_id(), tenant=tenant, namespace=tenant, name="resumed", model="tiny", config=cfg,
                        checkpoint_every=10, auto=[], num_examples={"train": 10, "validation": 0}, training_file=None,
                        validation_file=None, description=None, suffix=None, metadata=None)
    return manager.submit(record, {"train": "".join(json.dumps(r) + "\n" for r in toy_records(10))}).id
