"""The batch runner on an in-memory store with a fake executor: resume after a crash without redoing or
dropping a line, the run fence against a replica that lost the batch, retries of "not now" answers."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter

from softserve.batch.lines import LineResult
from softserve.batch.persist import BatchStore
from softserve.batch.records import new_record
from softserve.batch.runner import BatchManager
from softserve.store import keys
from softserve.store.backends import MemoryBackend
from softserve.store.usage import UsageLedger
from softserve.tuning.files import FileRegistry

ENDPOINT = "/v1/completions"


class FakeExecutor:
    """Answers {"echo": prompt}; blocks (forever, or until `release`) once `block_after` lines were answered."""

    def __init__(self, block_after: int | None = None, busy_first: int = 0) -> None:
        self.calls: Counter[str] = Counter()
        self.block_after = block_after
        self.busy_first = busy_first  # answer 429 this many times first
        self.release = asyncio.Event()

    def check(self, endpoint, body):
        return None if "prompt" in body else "body.prompt: Field required"

    async def run(self, tenant, role, endpoint, body, request_id):
        if self.busy_first > 0:
            self.busy_first -= 1
            return LineResult(429, {"error": {"code": "rate_limit_exceeded", "message": "later"}})
        if self.block_after is not None and sum(self.calls.values()) >= self.block_after:
            await self.release.wait()
        self.calls[body["prompt"]] += 1
        await asyncio.sleep(0.001)
        return LineResult(200, {"echo": body["prompt"]})


def make_batch(backend, n: int) -> tuple[dict, str]:
    text = "".join(json.dumps({"custom_id": f"id-{i}", "method": "POST", "url": ENDPOINT,
                               "body": {"model": "m", "prompt": f"p{i}"}}) + "\n" for i in range(n))
    record = new_record(tenant="acme", role="user", endpoint=ENDPOINT, input_file_id="file-x", completion_window="24h",
                        metadata=None, total=n)
    BatchStore(backend, owner="setup", lease_seconds=1).create(record, text)
    return record, text


def manager(backend, owner: str, executor, lease_seconds: float = 30.0, window: int = 4) -> BatchManager:
    store = BatchStore(backend, owner=owner, lease_seconds=lease_seconds)
    return BatchManager(store, FileRegistry(backend, 1 << 20), executor, window=window, max_running=2,
                        scan_seconds=0.05, flush_seconds=0.01)


async def wait_for(predicate, timeout: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.01)


def results(backend, record_id: str) -> tuple[dict, list[dict]]:
    record = BatchStore(backend, owner="x", lease_seconds=1).read("acme", record_id)
    files = FileRegistry(backend, 1 << 20)
    out = files.read_text("acme", record["output_file_id"]) if record["output_file_id"] else ""
    return record, [json.loads(line) for line in out.splitlines()]


def test_a_crashed_run_is_resumed_elsewhere_without_redoing_or_losing_a_line():
    backend = MemoryBackend()
    record, _ = make_batch(backend, 40)
    store = BatchStore(backend, owner="reader", lease_seconds=1)

    async def scenario():
        first = FakeExecutor(block_after=15)
        dying = manager(backend, "replica-a", first, lease_seconds=0.5)
        dying.store.leases.release = lambda lease: None  # a kill -9 releases nothing
        task = asyncio.ensure_future(dying.serve())
        await wait_for(lambda: store.read("acme", record["id"])["next_line"] >= 10)
        task.cancel()  # replica a dies: its lines in flight are lost, its lease stays until it expires
        for run in list(dying._running.values()):
            run.cancel()
        await asyncio.sleep(0)
        committed = store.read("acme", record["id"])["next_line"]
        second = FakeExecutor()
        other = manager(backend, "replica-b", second)
        task = asyncio.ensure_future(other.serve())
        await wait_for(lambda: store.read("acme", record["id"])["status"] == "completed")
        other.stopping.set()
        await other.close()
        task.cancel()
        return first, second, committed

    first, second, committed = asyncio.run(scenario())
    final, out = results(backend, record["id"])
    assert [o["custom_id"] for o in out] == [f"id-{i}" for i in range(40)]  # none lost, none twice, in order
    assert [o["response"]["body"]["echo"] for o in out] == [f"p{i}" for i in range(40)]
    assert [(r["run"], r["replica"]) for r in final["runs"]] == [(1, "replica-a"), (2, "replica-b")]
    assert final["runs"][1]["from_line"] == committed >= 10
    # What run 1 committed was not asked again; run 2 asked exactly the rest.
    assert set(second.calls) == {f"p{i}" for i in range(committed, 40)}
    assert final["request_counts"] == {"total": 40, "completed": 40, "failed": 0}
    assert store.active() == [] and backend.list(f"tenants/acme/batches/{record['id']}/output/") == []


def test_a_run_that_lost_the_batch_commits_nothing():
    backend = MemoryBackend()
    record, _ = make_batch(backend, 12)
    store = BatchStore(backend, owner="reader", lease_seconds=1)

    async def scenario():
        stale = FakeExecutor(block_after=4)
        old = manager(backend, "replica-a", stale)
        task = asyncio.ensure_future(old.serve())
        await wait_for(lambda: store.read("acme", record["id"])["next_line"] >= 4)
        # Another replica takes the batch over (as after an expired lease): the record's run moves on.
        backend.put(keys.batch_lease("acme", record["id"]),
                    json.dumps({"owner": "replica-b", "expires_at": time.time() + 60}).encode())
        store.update("acme", record["id"], lambda r: r | {"run": r["run"] + 1})
        stale.release.set()  # the old run wakes up and tries to commit
        await wait_for(lambda: not old.running)
        await asyncio.sleep(0.2)  # its scans find the batch leased by replica-b
        old.stopping.set()
        task.cancel()

    asyncio.run(scenario())
    final = store.read("acme", record["id"])
    assert final["next_line"] == 4 and all(run == 1 for _, _, run in final["chunks"])
    assert final["status"] == "in_progress"  # not finished by the stale run


def test_busy_answers_are_retried_not_reported():
    backend = MemoryBackend()
    record, _ = make_batch(backend, 5)

    async def scenario():
        executor = FakeExecutor(busy_first=3)
        m = manager(backend, "replica-a", executor)
        task = asyncio.ensure_future(m.serve())
        await wait_for(lambda: BatchStore(backend, owner="r", lease_seconds=1).read("acme", record["id"])["status"] == "completed")
        m.stopping.set()
        task.cancel()

    asyncio.run(scenario())
    final, out = results(backend, record["id"])
    assert final["request_counts"] == {"total": 5, "completed": 5, "failed": 0} and final["error_file_id"] is None
    assert len(out) == 5


def test_retention_removes_a_finished_batch_and_its_files_but_not_a_running_one():
    backend = MemoryBackend()
    done, _ = make_batch(backend, 3)
    running, _ = make_batch(backend, 3)
    store = BatchStore(backend, owner="reader", lease_seconds=1)
    usage = UsageLedger(backend)
    files = FileRegistry(backend, 1 << 20, usage=usage)
    usage.get("acme")  # the tenant's usage record exists (its upload of the input file made it)

    async def scenario():
        m = manager(backend, "replica-a", FakeExecutor())
        m.files = files
        m.retention_seconds = 3600.0
        m.store.active = lambda: [("acme", done["id"])]  # only `done` runs; `running` stays unfinished
        task = asyncio.ensure_future(m.serve())
        await wait_for(lambda: store.read("acme", done["id"])["status"] == "completed")
        await wait_for(lambda: not m.running)
        m.stopping.set()
        task.cancel()
        return m

    m = asyncio.run(scenario())
    record = store.read("acme", done["id"])
    finished_at = record["completed_at"]
    assert [(e.batch_id, e.finished_at) for e in store.finished()] == [(done["id"], finished_at)]
    out_id = record["output_file_id"]
    stored = files.get("acme", out_id).bytes
    assert usage.get("acme").file_bytes == stored
    assert m.sweep(now=finished_at + 3599) == 0  # not old enough
    assert store.read("acme", done["id"])["status"] == "completed"
    # `running` is not finished: even with an index entry (a bad one) it is not removed, only the entry.
    store.mark_finished("acme", running["id"], finished_at - 10**6)
    assert m.sweep(now=finished_at + 3601) == 2
    assert store.read("acme", running["id"])["status"] == "validating"
    assert [s.id for s in files.list("acme")] == [] and usage.get("acme").file_bytes == 0
    assert backend.list(keys.batch_prefix("acme", done["id"])) == [] and store.finished() == []
    assert [r["id"] for r in store.list("acme")] == [running["id"]]


def test_retention_reaches_batches_that_finished_before_the_index():
    backend = MemoryBackend()
    record, _ = make_batch(backend, 1)
    store = BatchStore(backend, owner="reader", lease_seconds=1)
    store.update("acme", record["id"], lambda r: r | {"status": "cancelled", "cancelled_at": 1000})
    m = manager(backend, "replica-a", FakeExecutor())
    m.retention_seconds = 10.0
    assert m.sweep(now=1005) == 0 and [e.finished_at for e in store.finished()] == [1000]
    assert m.sweep(now=1011) == 1 and store.list("acme") == []
    m.retention_seconds = 0  # 0 keeps everything forever
    record, _ = make_batch(backend, 1)
    store.update("acme", record["id"], lambda r: r | {"status": "failed", "failed_at": 1})
    store.mark_finished("acme", record["id"], 1)
    assert m.sweep(now=10**10) == 0 and len(store.list("acme")) == 1
