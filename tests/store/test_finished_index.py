"""The once-per-store backfill of a finished-work index, shared by tuning jobs and batches."""

from __future__ import annotations

import json

from softserve.store import keys
from softserve.store.backends import MemoryBackend
from softserve.store.finished_index import backfill_finished

READY = "work/finished-index.json"


def test_backfill_hands_over_finished_records_of_its_kind_once():
    backend = MemoryBackend()
    backend.put(keys.batch_record("acme", "batch_done"), json.dumps({"status": "completed", "n": 1}).encode())
    backend.put(keys.batch_record("beta", "batch_run"), json.dumps({"status": "in_progress"}).encode())
    backend.put(keys.batch_record("beta", "batch_bad"), b"{not json")
    backend.put(keys.batch_prefix("acme", "batch_done") + "input.jsonl", b'{"status": "completed"}\n')  # not a record
    backend.put(keys.job_record("acme", "ftjob-1"), json.dumps({"status": "completed"}).encode())  # another kind
    seen = []

    def on_finished(tenant, name, record):
        seen.append((tenant, name, record))

    backfill_finished(backend, READY, "batch", keys.batch_record, ("completed", "failed"), on_finished)
    assert seen == [("acme", "batch_done", {"status": "completed", "n": 1})]
    assert json.loads(backend.get(READY)) == {"version": 1}
    backend.put(keys.batch_record("acme", "batch_late"), json.dumps({"status": "failed"}).encode())
    backfill_finished(backend, READY, "batch", keys.batch_record, ("completed", "failed"), on_finished)
    assert len(seen) == 1  # the ready key ends it: no second walk
