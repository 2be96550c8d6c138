"""Versioned store: names, versions, rollback, deletion, tenant isolation, crash safety, backend."""

from __future__ import annotations

import os
import uuid

import pytest
import torch

from softserve.store import format as fmt
from softserve.store.backends import LocalBackend, MemoryBackend
from softserve.store.store import PromptStore
from softserve.store.types import PromptIntegrityError, PromptNotFound, PromptValidationError
from tests.support.concurrency import run_together
from tests.support.prompts import CFG, MODEL, blob


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.process)])
def make_backend(request, tmp_path):
    """Factory of backends that all see the same data: calling it again is "a fresh process".
    `s3` is a real S3 server (SeaweedFS, see tests/support/s3_server.py), one fresh prefix per test."""
    if request.param == "local":
        return lambda: LocalBackend(tmp_path / "d")
    seaweed = request.getfixturevalue("seaweed")
    from softserve.store.backends.s3 import S3Backend

    prefix = f"store-tests/{uuid.uuid4().hex[:16]}"
    return lambda: S3Backend(seaweed.bucket, prefix, client=seaweed.client())


@pytest.fixture
def store(make_backend) -> PromptStore:
    return PromptStore(make_backend(), MODEL)


# ---- names -------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["../x", "a@b", "", "naïve", "x" * 65, "a/b", ".hidden", "-x", "x\n", "a b", ".."])
def test_bad_names_rejected(store, bad):
    with pytest.raises(PromptValidationError) as ei:
        store.put("acme", bad, blob(1), CFG)
    assert ei.value.status_code == 400
    with pytest.raises(PromptValidationError):
        store.put(bad, "ok", blob(1), CFG)


def test_good_names(store):
    for name in ["a", "A1", "x" * 64, "my-prompt_v1.2"]:
        store.put("acme", name, blob(1), CFG)
    assert [m.name for m in store.list("acme")] == sorted(["a", "A1", "x" * 64, "my-prompt_v1.2"])


# ---- versions ----------------------------------------------------------------------------------


def test_versions_latest_and_pinning(store):
    m1, _ = store.put("acme", "p", blob(1), CFG, "first")
    assert m1.version == fmt.version_id(m1.sha256, m1.adapter_config)[:12] and m1.ref == f"p@{m1.version}" and m1.description == "first"
    again, _ = store.put("acme", "p", blob(1), None, "ignored")
    assert again == m1 and again.description == "first"  # same bytes: same version, no duplicate
    assert [m.version for m in store.versions("acme", "p")] == [m1.version]

    m2, _ = store.put("acme", "p", blob(2), CFG)
    assert m2.version != m1.version
    assert store.resolve("acme", "p") == m2
    assert store.resolve("acme", "p", m1.version) == m1
    assert store.resolve("acme", "p", m1.version[:6]) == m1  # unique prefix
    assert [m.version for m in store.versions("acme", "p")] == [m2.version, m1.version]
    assert [m.version for m in store.list("acme")] == [m2.version]
    with pytest.raises(PromptNotFound):
        store.resolve("acme", "p", m1.version[:5])  # too short to be a prefix
    with pytest.raises(PromptNotFound):
        store.resolve("acme", "p", "0" * 12)


def test_reupload_rolls_back(store):
    m1, _ = store.put("acme", "p", blob(1), CFG)
    m2, _ = store.put("acme", "p", blob(2), CFG)
    back, _ = store.put("acme", "p", blob(1), CFG)
    assert back == m1 and store.resolve("acme", "p") == m1
    assert [m.version for m in store.versions("acme", "p")] == [m1.version, m2.version]


def test_version_of_other_name_not_resolvable(store):
    m1, _ = store.put("acme", "p", blob(1), CFG)
    store.put("acme", "q", blob(2), CFG)
    with pytest.raises(PromptNotFound):
        store.resolve("acme", "q", m1.version)


def test_delete(store):
    m1, _ = store.put("acme", "p", blob(1), CFG)
    store.put("acme", "p", blob(2), CFG)
    store.put("acme", "keep", blob(1), CFG)
    store.delete("acme", "p")
    for v in (None, m1.version):
        with pytest.raises(PromptNotFound):
            store.resolve("acme", "p", v)
    with pytest.raises(PromptNotFound):
        store.versions("acme", "p")
    assert [m.name for m in store.list("acme")] == ["keep"]
    with pytest.raises(PromptNotFound):
        store.delete("acme", "p")
    # The shared blob still serves the other name.
    assert torch.equal(store.load_tensor(store.resolve("acme", "keep")), store.load_tensor(m1))
    # Re-creating the name starts a fresh history: old versions do not come back.
    m3, _ = store.put("acme", "p", blob(3), CFG)
    assert [m.version for m in store.versions("acme", "p")] == [m3.version]
    with pytest.raises(PromptNotFound):
        store.resolve("acme", "p", m1.version)


def test_tenant_isolation(store):
    m, _ = store.put("acme", "p", blob(1), CFG)
    with pytest.raises(PromptNotFound):
        store.resolve("beta", "p")
    with pytest.raises(PromptNotFound):
        store.resolve("beta", "p", m.version)
    with pytest.raises(PromptNotFound):
        store.delete("beta", "p")
    assert store.list("beta") == []
    assert store.resolve("acme", "p").tenant == "acme"


def test_load_tensor_verifies_hash(make_backend):
    backend = make_backend()
    store = PromptStore(backend, MODEL)
    m, _ = store.put("acme", "p", blob(1), CFG)
    assert store.load_tensor(m).dtype == torch.float32
    backend.put(store.blob_key(m.sha256), blob(2))  # corrupt: valid file, wrong content
    with pytest.raises(PromptIntegrityError):
        store.load_tensor(m)
    backend.delete(store.blob_key(m.sha256))
    with pytest.raises(PromptIntegrityError):
        store.load_tensor(m)


def test_meta_survives_reopen(make_backend):
    m, _ = PromptStore(make_backend(), MODEL).put("acme", "p", blob(1), CFG, "d")
    again = PromptStore(make_backend(), MODEL).resolve("acme", "p")
    assert again == m and again.adapter_config == m.adapter_config


def test_concurrent_puts(store):
    assert run_together(lambda i=i: store.put("acme", "p", blob(i % 3), CFG) for i in range(12)) == []
    assert len(store.versions("acme", "p")) == 3


# ---- crash safety --------------------------------------------------------------------------------


class Killed(Exception):
    pass


def _kill_on(backend, predicate):
    real_put = backend.put

    def put(key, data, *, if_absent=False):
        if predicate(key):
            raise Killed(key)
        return real_put(key, data, if_absent=if_absent)

    backend.put = put
    real_cas = getattr(backend, "put_if_match", None)
    if real_cas is not None:  # backends with compare-and-swap write heads through it

        def put_if_match(key, data, etag):
            if predicate(key):
                raise Killed(key)
            return real_cas(key, data, etag)

        backend.put_if_match = put_if_match


@pytest.mark.parametrize("kill_at", ["head.json", "/versions/", "blobs/"])
def test_crash_during_update_keeps_old_head(make_backend, kill_at):
    backend = make_backend()
    store = PromptStore(backend, MODEL)
    m1, _ = store.put("acme", "p", blob(1), CFG)
    _kill_on(backend, lambda k: kill_at in k)
    with pytest.raises(Killed):
        store.put("acme", "p", blob(2), CFG)
    with pytest.raises(Killed):
        store.put("acme", "new", blob(3), CFG)
    # A fresh process on the same data sees only the complete state.
    fresh = PromptStore(make_backend(), MODEL)
    assert fresh.resolve("acme", "p") == m1
    assert [m.version for m in fresh.versions("acme", "p")] == [m1.version]
    assert [m.name for m in fresh.list("acme")] == ["p"]
    with pytest.raises(PromptNotFound):
        fresh.resolve("acme", "new")
    v2 = PromptStore(MemoryBackend(), MODEL).put("acme", "p", blob(2), CFG)[0].version
    with pytest.raises(PromptNotFound):
        fresh.resolve("acme", "p", v2)  # a written-but-unlisted version manifest stays invisible
    # The retried upload completes normally.
    assert fresh.put("acme", "p", blob(2), CFG)[0].version == v2


def test_crash_during_delete_cleanup(make_backend):
    backend = make_backend()
    store = PromptStore(backend, MODEL)
    m1, _ = store.put("acme", "p", blob(1), CFG)
    real_delete = backend.delete

    def delete(key):
        if "/versions/" in key:
            raise Killed(key)
        real_delete(key)

    backend.delete = delete
    with pytest.raises(Killed):
        store.delete("acme", "p")
    backend.delete = real_delete
    assert store.list("acme") == []
    with pytest.raises(PromptNotFound):
        store.resolve("acme", "p", m1.version)


# ---- LocalBackend --------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["../x", "/etc/passwd", "a/../b", "a//b", "a/.tmp-1", ".x", "", "a\\b", "a/"])
def test_local_backend_rejects_bad_keys(tmp_path, key):
    b = LocalBackend(tmp_path)
    with pytest.raises(ValueError):
        b.put(key, b"x")
    with pytest.raises(ValueError):
        b.get(key)


def test_local_backend_never_exposes_temp_files(tmp_path, monkeypatch):
    b = LocalBackend(tmp_path)
    b.put("k/v.json", b"old")
    (tmp_path / "k" / ".tmp-leftover").write_bytes(b"partial")  # as left by a kill -9
    assert b.list("") == ["k/v.json"] and b.list("k/") == ["k/v.json"]

    def boom(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        b.put("k/v.json", b"new")
    monkeypatch.undo()
    assert b.get("k/v.json") == b"old"
    # The failed put cleaned up its own temp file; only the simulated kill -9 leftover remains.
    assert sorted(p.name for p in (tmp_path / "k").iterdir()) == [".tmp-leftover", "v.json"]
    assert b.list("") == ["k/v.json"]


def test_memory_backend_matches_protocol():
    from softserve.store.backends import StorageBackend

    assert isinstance(MemoryBackend(), StorageBackend) and isinstance(LocalBackend.__new__(LocalBackend), StorageBackend)
