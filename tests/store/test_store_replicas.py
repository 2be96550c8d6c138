"""Backends' contract (memory, local, real S3) and several replicas on one store: compare-and-swap
head updates that never lose an upload, and TTL revalidation of name -> version resolution."""

from __future__ import annotations

import threading
import time
import uuid

import pytest
import torch

from softserve.store.backends import ConditionalBackend, LocalBackend, MemoryBackend, open_backend
from softserve.store.store import PromptStore
from softserve.store.types import PromptMeta, PromptNotFound
from tests.support.prompts import CFG, MODEL, blob, tensor

TTL = 0.6


@pytest.fixture(params=["memory", "local", pytest.param("s3", marks=pytest.mark.process)])
def make_backend(request, tmp_path):
    """Each call is a new backend instance on the same data, as a separate replica would open."""
    if request.param == "memory":
        shared = MemoryBackend()
        return lambda: shared
    if request.param == "local":
        return lambda: LocalBackend(tmp_path / "d")
    seaweed = request.getfixturevalue("seaweed")
    from softserve.store.backends.s3 import S3Backend

    prefix = f"replica-tests/{uuid.uuid4().hex[:16]}"
    return lambda: S3Backend(seaweed.bucket, prefix, client=seaweed.client())


# ---- backend contract ---------------------------------------------------------------------------


def test_backend_contract(make_backend):
    b = make_backend()
    assert isinstance(b, ConditionalBackend)
    assert b.put("a/b/c.json", b"1")
    assert b.get("a/b/c.json") == b"1" and b.exists("a/b/c.json")
    assert b.put("a/b/c.json", b"2") and b.get("a/b/c.json") == b"2"
    assert b.put("a/b/c.json", b"3", if_absent=True) is False and b.get("a/b/c.json") == b"2"
    assert b.put("a/d.json", b"x", if_absent=True) is True
    assert b.list("a/") == ["a/b/c.json", "a/d.json"]
    assert b.list("a/b") == ["a/b/c.json"]
    assert b.list("zzz/") == []
    b.delete("a/d.json")
    b.delete("a/d.json")  # missing is fine
    with pytest.raises(KeyError):
        b.get("a/d.json")
    assert not b.exists("a/d.json")
    with pytest.raises(KeyError):
        b.get("a/b")  # a "directory" is not a key
    for bad in ["../x", "/etc/passwd", "a/../b", "a//b", "a/.tmp-1", ""]:
        with pytest.raises(ValueError):
            b.get(bad)


def test_backend_compare_and_swap(make_backend):
    b = make_backend()
    assert b.put_if_match("h.json", b"v1", None) is True  # create iff absent
    assert b.put_if_match("h.json", b"v1b", None) is False
    data, etag = b.get_with_etag("h.json")
    assert data == b"v1"
    assert b.put_if_match("h.json", b"v2", etag) is True
    assert b.put_if_match("h.json", b"v3", etag) is False  # stale etag: nothing written
    assert b.get("h.json") == b"v2"
    _, etag2 = b.get_with_etag("h.json")
    assert etag2 != etag
    assert b.delete_if_match("h.json", etag) is False and b.exists("h.json")
    assert b.delete_if_match("h.json", etag2) is True and not b.exists("h.json")
    assert b.put_if_match("h.json", b"v4", etag2) is False  # deleted meanwhile
    with pytest.raises(KeyError):
        b.get_with_etag("h.json")


def test_backend_cas_race_has_one_winner(make_backend):
    b = make_backend()
    b.put("race.json", b"base")
    _, etag = b.get_with_etag("race.json")
    backends = [make_backend() for _ in range(6)]
    winners: list[int] = []
    barrier = threading.Barrier(len(backends))

    def work(i: int) -> None:
        barrier.wait()
        if backends[i].put_if_match("race.json", f"w{i}".encode(), etag):
            winners.append(i)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(backends))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(winners) == 1
    assert b.get("race.json") == f"w{winners[0]}".encode()


# ---- replicas -----------------------------------------------------------------------------------


def test_concurrent_uploads_from_replicas_lose_nothing(make_backend):
    """Two replicas x 3 threads upload 12 different tensors to one name at once: every upload
    that returned is in the name's history (compare-and-swap on the head, retried on conflict)."""
    replicas = [PromptStore(make_backend(), MODEL), PromptStore(make_backend(), MODEL)]
    results: list[str] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(6)

    def work(r: int, t: int) -> None:
        barrier.wait()
        try:
            for j in range(2):
                meta, _ = replicas[r].put("acme", "shared", blob(100 + r * 100 + t * 10 + j), CFG)
                results.append(meta.version)
        except BaseException as e:  # pragma: no cover
            errors.append(e)

    threads = [threading.Thread(target=work, args=(r, t)) for r in range(2) for t in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(set(results)) == 12
    fresh = PromptStore(make_backend(), MODEL)
    live = {m.version for m in fresh.versions("acme", "shared")}
    assert live == set(results)
    # Every listed version resolves (its manifest exists and matches).
    for v in live:
        assert fresh.resolve("acme", "shared", v).version == v


def test_same_new_version_from_two_replicas_is_consistent(make_backend):
    """Both replicas upload the same tensor with different descriptions at once: one manifest wins
    and the head's inline latest agrees with it."""
    a, b = PromptStore(make_backend(), MODEL), PromptStore(make_backend(), MODEL)
    a.put("acme", "p", blob(1), CFG)
    barrier = threading.Barrier(2)
    out = {}

    def work(store, label):
        barrier.wait()
        out[label] = store.put("acme", "p", blob(2), CFG, label)[0]

    ts = [threading.Thread(target=work, args=(s, lbl)) for s, lbl in ((a, "from-a"), (b, "from-b"))]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert out["from-a"] == out["from-b"]
    fresh = PromptStore(make_backend(), MODEL)
    latest = fresh.resolve("acme", "p")
    assert latest == out["from-a"] and latest.description == out["from-a"].description
    versions = fresh.versions("acme", "p")
    assert len(versions) == 2 and versions[0] == latest


def test_replicas_follow_each_other_within_revalidation_window(make_backend):
    writer = PromptStore(make_backend(), MODEL, revalidate_seconds=TTL)
    reader = PromptStore(make_backend(), MODEL, revalidate_seconds=TTL)

    def eventually(check, what: str) -> float:
        start = time.monotonic()
        while True:
            try:
                if check():
                    return time.monotonic() - start
            except PromptNotFound:
                pass
            if time.monotonic() - start > TTL + 2.0:
                raise AssertionError(f"reader did not see {what} within {TTL} s (+ slack)")
            time.sleep(0.02)

    with pytest.raises(PromptNotFound):
        reader.resolve("acme", "p")  # the miss is cached too
    m1, _ = writer.put("acme", "p", blob(1), CFG)
    assert writer.resolve("acme", "p") == m1  # read-your-writes on the writing replica
    eventually(lambda: reader.resolve("acme", "p") == m1, "the upload")

    m2, _ = writer.put("acme", "p", blob(2), CFG)
    assert reader.resolve("acme", "p") == m1  # still cached: no backend read inside the window
    eventually(lambda: reader.resolve("acme", "p") == m2, "the update")
    assert reader.resolve("acme", "p", m1.version) == m1  # pinned old version still live

    writer.delete("acme", "p")
    with pytest.raises(PromptNotFound):
        writer.resolve("acme", "p")

    def gone() -> bool:
        try:
            reader.resolve("acme", "p")
            return False
        except PromptNotFound:
            return True

    eventually(gone, "the delete")
    with pytest.raises(PromptNotFound):
        reader.resolve("acme", "p", m1.version)


def test_resolution_cache_reads_backend_once_per_window(tmp_path):
    backend = LocalBackend(tmp_path / "d")
    store = PromptStore(backend, MODEL, revalidate_seconds=30)
    m, _ = store.put("acme", "p", blob(1), CFG)
    reads = []
    real_get = backend.get_with_etag

    def counting(key):
        reads.append(key)
        return real_get(key)

    backend.get_with_etag = counting
    for _ in range(50):
        assert store.resolve("acme", "p") == m
    assert reads == []  # served from the cache populated by our own write
    store.invalidate("acme", "p")
    assert store.resolve("acme", "p") == m and len(reads) == 1


def _check_after_delete_and_update(store: PromptStore, before: PromptMeta, update_seed: int) -> str:
    """Whichever of a delete and an update of the same name landed last, the state is one of two whole
    ones; returns which ("updated" or "deleted") after checking it against the real content."""
    try:
        versions = store.versions("acme", "p")
    except PromptNotFound:
        # The delete came last: gone from resolution and listing, its versions too, old and new.
        assert "p" not in [m.name for m in store.list("acme")]
        with pytest.raises(PromptNotFound):
            store.resolve("acme", "p", before.version)
        return "deleted"
    # The update came last: its tensor is the latest, every listed version resolves to a readable
    # manifest, and the deleted history did not come back under it.
    latest = store.resolve("acme", "p")
    assert versions[0] == latest
    assert torch.equal(store.load_tensor(latest), tensor(update_seed))
    assert before.version not in [v.version for v in versions]
    for version in versions:
        assert store.resolve("acme", "p", version.version) == version
    return "updated"


@pytest.mark.parametrize("order", ["race", "delete-first", "update-first"])
def test_delete_racing_update_leaves_consistent_state(make_backend, order):
    """Two replicas delete and update one name. "race" lets the threads decide (either outcome is
    checked with its content); the forced orders make sure both outcomes are checked on every run."""
    a, b = PromptStore(make_backend(), MODEL), PromptStore(make_backend(), MODEL)
    rounds = 3 if order == "race" else 1
    for round_ in range(rounds):
        before, _ = a.put("acme", "p", blob(10 * round_), CFG)
        update_seed = 10 * round_ + 1

        def upd():
            b.put("acme", "p", blob(update_seed), CFG)

        def rm():
            try:
                a.delete("acme", "p")
            except PromptNotFound:
                pass

        if order == "race":
            barrier, errors = threading.Barrier(2), []

            def run(step):
                barrier.wait()
                try:
                    step()
                except Exception as exc:  # a failed update would pass for "deleted": fail instead
                    errors.append(exc)

            ts = [threading.Thread(target=run, args=(step,)) for step in (upd, rm)]
            for t in ts:
                t.start()
            for t in ts:
                t.join()
            assert errors == []
        else:
            first, last = (rm, upd) if order == "delete-first" else (upd, rm)
            first()
            last()
        outcome = _check_after_delete_and_update(PromptStore(make_backend(), MODEL), before, update_seed)
        if order != "race":
            assert outcome == {"delete-first": "updated", "update-first": "deleted"}[order]
        if outcome == "updated":
            a.delete("acme", "p")


# ---- open_backend / S3 specifics ----------------------------------------------------------------


def test_open_backend_urls(tmp_path):
    assert isinstance(open_backend(tmp_path / "x"), LocalBackend)
    assert isinstance(open_backend(f"file://{tmp_path}/y"), LocalBackend)
    assert (tmp_path / "y").is_dir()
    assert isinstance(open_backend("memory://"), MemoryBackend)
    with pytest.raises(ValueError):
        open_backend("gs://bucket/x")


@pytest.mark.process
def test_open_backend_s3(seaweed, monkeypatch):
    from softserve.store.backends.s3 import S3Backend

    for k, v in seaweed.env().items():
        monkeypatch.setenv(k, v)
    b = open_backend(f"s3://{seaweed.bucket}/ob-{uuid.uuid4().hex[:8]}", s3_endpoint_url=seaweed.endpoint_url)
    assert isinstance(b, S3Backend) and b.conditional_writes is True  # SeaweedFS enforces If-Match
    assert b.list("") == []  # the probe object is gone
    store = PromptStore(b, MODEL)
    m, _ = store.put("acme", "p", blob(1), CFG)
    assert store.resolve("acme", "p") == m
    # Endpoint from SOFTSERVE_S3_ENDPOINT_URL, as the docs say (read by the settings, the one place env is read).
    from softserve.config import Settings

    monkeypatch.setenv("SOFTSERVE_S3_ENDPOINT_URL", seaweed.endpoint_url)
    b2 = open_backend(f"s3://{seaweed.bucket}/{b.prefix}", s3_endpoint_url=Settings().s3_endpoint_url)
    assert PromptStore(b2, MODEL).resolve("acme", "p") == m


def test_s3_unreachable_is_503(monkeypatch):
    pytest.importorskip("boto3")
    from tests.support.s3_server import free_port

    from softserve.store.backends.s3 import S3Backend, StorageUnavailable

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    b = S3Backend("bucket", "p", endpoint_url=f"http://127.0.0.1:{free_port()}")
    store = PromptStore(b, MODEL)
    with pytest.raises(StorageUnavailable) as ei:
        store.resolve("acme", "p")
    assert ei.value.status_code == 503


@pytest.mark.process
def test_s3_wrong_credentials_is_503(seaweed):
    from softserve.store.backends.s3 import S3Backend, StorageUnavailable

    import boto3

    client = boto3.session.Session().client(
        "s3", endpoint_url=seaweed.endpoint_url, aws_access_key_id="nobody", aws_secret_access_key="wrong",
        region_name="us-east-1")
    b = S3Backend(seaweed.bucket, "creds", client=client)
    with pytest.raises(StorageUnavailable):
        b.get("x.json")
