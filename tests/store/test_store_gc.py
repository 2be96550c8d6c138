"""Store garbage collection (issue #17 item 10) and the keyspaces softserve.store owns (issue #15): unreferenced
blobs, orphan manifests and stale temp/lock files go after a grace period; nothing referenced or young does,
also when an upload re-uses an old unreferenced blob while the GC runs; usage records are recounted."""

from __future__ import annotations

import json
import os
import time
import uuid

import pytest

from softserve.store import keys
from softserve.store.backends import LocalBackend, MemoryBackend
from softserve.store.gc import collect_garbage
from softserve.store.store import PromptStore
from softserve.store.usage import Usage
from tests.support.prompts import CFG, H, MODEL, blob

GRACE = 3600.0


def _memory(tmp_path):
    return MemoryBackend()


def _local(tmp_path):
    return LocalBackend(tmp_path / "store")


def age(backend, key: str, seconds: float = 2 * GRACE) -> None:
    """Make `key` look written `seconds` ago."""
    when = time.time() - seconds
    if isinstance(backend, MemoryBackend):
        backend.set_mtime(key, when)
    else:
        os.utime(backend._path(key), (when, when))


def age_all(backend, prefix: str = "") -> None:
    for key in backend.list(prefix):
        age(backend, key)


@pytest.fixture(params=["memory", "local"])
def backend(request, tmp_path):
    return {"memory": _memory, "local": _local}[request.param](tmp_path)


# ---- keys: one module builds them, and the strings are what existing stores hold --------------------
def test_every_key_is_built_by_prompt_store_keys_with_the_existing_strings():
    assert keys.blob("ab" * 32) == f"blobs/sha256/{'ab' * 32}.safetensors"
    assert keys.blob_sha(keys.blob("ab" * 32)) == "ab" * 32 and keys.blob_sha("blobs/sha256/x/y.json") is None
    assert keys.prompt_head("t", "n") == "tenants/t/prompts/n/head.json"
    assert keys.prompt_version("t", "n", "0123456789ab") == "tenants/t/prompts/n/versions/0123456789ab.json"
    assert keys.file_data("t", "file-1") == "tenants/t/files/file-1.jsonl"
    assert keys.file_meta("t", "file-1") == "tenants/t/files/file-1.json"
    assert keys.job_record("t", "j") == "tenants/t/tuning/jobs/j/record.json"
    assert keys.job_data("t", "j", "train") == "tenants/t/tuning/jobs/j/data/train.jsonl"
    assert keys.job_events("t", "j", 7) == "tenants/t/tuning/jobs/j/events/0000000007.jsonl"
    assert keys.job_checkpoint("t", "j", 20) == "tenants/t/tuning/jobs/j/checkpoints/0000000020.safetensors"
    assert keys.job_lease("t", "j") == "tenants/t/tuning/jobs/j/lease.json"
    assert keys.active_job("j") == "tuning/active/j.json" and keys.active_job_id("tuning/active/j.json") == "j"
    assert keys.usage("t") == "tenants/t/usage.json"
    assert keys.parse_tenant_key("tenants/t/prompts/n/versions/v.json") == ("t", "version", "n", "v")
    assert keys.parse_tenant_key("tenants/t/tuning/jobs/j/record.json").kind == "job"


def test_no_module_outside_prompt_store_keys_spells_a_store_key():
    """files.py and persist.py (and the store) build keys through softserve.store.keys only."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
    for rel in ("softserve/store/store.py", "softserve/tuning/files.py", "softserve/tuning/persist.py", "softserve/tuning/jobs.py"):
        code = "\n".join(line for line in open(os.path.join(root, rel)).read().splitlines()
                         if not line.lstrip().startswith(("#", "tenants/", "tuning/active")))
        for literal in ('"tenants/', 'f"tenants/', '"tuning/active', '"blobs/'):
            assert literal not in code, (rel, literal)


# ---- garbage collection ---------------------------------------------------------------------------------
def test_gc_deletes_old_orphan_blobs_keeps_fresh_and_referenced(backend):
    store = PromptStore(backend, MODEL)
    live1, _ = store.put("acme", "p", blob(1), CFG)
    live2, _ = store.put("acme", "p", blob(2), CFG)  # an older version stays listed: its blob is referenced
    backend.put(keys.blob("0" * 64), blob(3))  # orphan (a crashed upload), old
    backend.put(keys.blob("1" * 64), blob(4))  # orphan, but young: an upload may be about to write its head
    age_all(backend)
    age(backend, keys.blob("1" * 64), 10.0)

    dry = collect_garbage(backend, GRACE, dry_run=True)
    assert (dry.blobs_deleted, dry.blobs_young, dry.blobs_referenced) == (1, 1, 2)
    assert backend.exists(keys.blob("0" * 64))  # a dry run deletes nothing

    report = collect_garbage(backend, GRACE)
    assert report.blobs_deleted == 1 and report.blob_bytes_freed == len(blob(3)) == report.bytes_freed
    assert not backend.exists(keys.blob("0" * 64)) and backend.exists(keys.blob("1" * 64))
    for meta in (live1, live2):
        assert store.load_tensor(meta).shape == (4, H)  # every live version still loads
    assert collect_garbage(backend, GRACE).blobs_deleted == 0


def test_gc_collects_the_blob_of_a_deleted_prompt(backend):
    store = PromptStore(backend, MODEL)
    meta, _ = store.put("acme", "p", blob(1), CFG)
    store.delete("acme", "p")
    age_all(backend)
    assert collect_garbage(backend, GRACE).blobs_deleted == 1
    assert not backend.exists(keys.blob(meta.sha256))


def test_gc_keeps_a_blob_two_tenants_share_until_both_deleted(backend):
    store = PromptStore(backend, MODEL)
    a, _ = store.put("acme", "mine", blob(1), CFG)
    b, _ = store.put("beta", "theirs", blob(1), CFG)
    assert a.sha256 == b.sha256 and len(backend.list(keys.BLOBS_PREFIX)) == 1
    # Each tenant pays for what it references, shared or not.
    assert store.usage.get("acme").prompt_bytes == store.usage.get("beta").prompt_bytes == a.nbytes
    store.delete("acme", "mine")
    age_all(backend)
    assert collect_garbage(backend, GRACE).blobs_deleted == 0
    assert store.load_tensor(store.resolve("beta", "theirs")).shape == (4, H)
    store.delete("beta", "theirs")
    assert collect_garbage(backend, GRACE).blobs_deleted == 1


@pytest.mark.parametrize("gc_runs", ["after_finding_the_blob", "after_rewriting_the_blob", "after_the_head"])
def test_upload_reusing_an_old_unreferenced_blob_while_gc_runs(tmp_path, gc_runs, request):
    """Replica A's GC marks while replica B uploads a tensor whose (old, unreferenced) blob exists:
    B's put-if-absent finds it and writes nothing. Run the whole GC at each point of B's upload: the
    blob B's new version needs must survive (B rewrites it, so its mtime is fresh, and checks it after
    its head write)."""
    for kind in ("memory", "local"):
        base = MemoryBackend if kind == "memory" else LocalBackend
        runs = []

        class Racy(base):
            def put(self, key, data, *, if_absent=False):
                wrote = super().put(key, data, if_absent=if_absent)
                is_blob = keys.blob_sha(key) is not None
                if is_blob and not runs and (
                    (gc_runs == "after_finding_the_blob" and if_absent and not wrote)
                    or (gc_runs == "after_rewriting_the_blob" and not if_absent)
                ):
                    runs.append(collect_garbage(self, GRACE))
                return wrote

            def put_if_match(self, key, data, etag):
                ok = super().put_if_match(key, data, etag)
                if gc_runs == "after_the_head" and ok and key.endswith("/head.json") and not runs and reused:
                    runs.append(collect_garbage(self, GRACE))
                return ok

        reused = False
        backend = Racy() if kind == "memory" else Racy(tmp_path / f"s-{gc_runs}")
        store = PromptStore(backend, MODEL)
        old, _ = store.put("acme", "old", blob(7), CFG)
        store.delete("acme", "old")
        age_all(backend)  # the blob is old and referenced by nothing: garbage, until B re-uses it
        reused = True
        new, _ = store.put("beta", "new", blob(7), CFG)
        assert new.sha256 == old.sha256 and len(runs) == 1, runs
        assert backend.exists(keys.blob(new.sha256)), f"{kind}: the GC deleted a blob a live version needs"
        assert store.load_tensor(store.resolve("beta", "new")).shape == (4, H)
        # And a later GC, with the upload finished, keeps it as referenced.
        assert collect_garbage(backend, GRACE).blobs_deleted == 0


def test_gc_deletes_orphan_manifests_older_than_grace(backend):
    store = PromptStore(backend, MODEL)
    live, _ = store.put("acme", "p", blob(1), CFG)
    # Leftovers: a manifest of a crashed upload (never listed) and one of a deleted name (killed mid-delete).
    crashed = live.__class__(**{**live.to_dict(), "version": "c0ffee000000"})
    backend.put(keys.prompt_version("acme", "p", "c0ffee000000"), json.dumps(crashed.to_dict()).encode())
    backend.put(keys.prompt_version("acme", "gone", "c0ffee000001"), json.dumps(crashed.to_dict()).encode())
    backend.put(keys.prompt_version("acme", "p", "c0ffee000002"), json.dumps(crashed.to_dict()).encode())
    age_all(backend)
    age(backend, keys.prompt_version("acme", "p", "c0ffee000002"), 5.0)  # young: an upload in progress
    report = collect_garbage(backend, GRACE)
    assert report.manifests_deleted == 2
    assert not backend.exists(keys.prompt_version("acme", "p", "c0ffee000000"))
    assert not backend.exists(keys.prompt_version("acme", "gone", "c0ffee000001"))
    assert backend.exists(keys.prompt_version("acme", "p", "c0ffee000002"))
    assert backend.exists(keys.prompt_version("acme", "p", live.version))
    assert store.versions("acme", "p")[0].version == live.version


def test_gc_recounts_usage_records(backend):
    store = PromptStore(backend, MODEL)
    m, _ = store.put("acme", "p", blob(1), CFG)
    store.put("acme", "q", blob(2), CFG)
    assert store.usage.get("acme") == Usage(prompts=2, prompt_bytes=2 * m.nbytes)
    backend.put(keys.usage("acme"), Usage(prompts=99, prompt_bytes=1).to_json())  # drift (e.g. a kill -9)
    report = collect_garbage(backend, GRACE)
    assert report.usage_repaired == ["acme"]
    assert store.usage.get("acme") == Usage(prompts=2, prompt_bytes=2 * m.nbytes)
    # A store written before usage records existed: the first read rebuilds the record from the store.
    backend.delete(keys.usage("acme"))
    assert store.usage.get("acme") == Usage(prompts=2, prompt_bytes=2 * m.nbytes)


def test_gc_removes_stale_temp_files_and_lock_files_of_deleted_keys(tmp_path):
    backend = LocalBackend(tmp_path / "store")
    store = PromptStore(backend, MODEL)
    store.put("acme", "keep", blob(1), CFG)
    store.put("acme", "gone", blob(2), CFG)
    store.put("acme", "gone", blob(3), CFG)  # a CAS update: leaves .lock-head.json beside the head
    store.delete("acme", "gone")
    root = tmp_path / "store"
    stale_tmp = root / "blobs" / "sha256" / ".tmp-killed"
    stale_tmp.write_bytes(b"x" * 100)
    gone_lock = root / "tenants/acme/prompts/gone/.lock-head.json"
    keep_lock = root / "tenants/acme/prompts/keep/.lock-head.json"
    keep_lock.touch()
    assert gone_lock.exists()
    old = time.time() - 2 * GRACE
    for path in (stale_tmp, gone_lock, keep_lock):
        os.utime(path, (old, old))
    report = collect_garbage(backend, GRACE)
    assert report.temp_files_deleted == 2 and report.temp_bytes_freed >= 100
    assert not stale_tmp.exists() and not gone_lock.exists() and keep_lock.exists()
    store.put("acme", "gone", blob(4), CFG)  # the key's lock is simply created again
    store.put("acme", "gone", blob(5), CFG)
    assert [m.version for m in store.versions("acme", "gone")][0] == store.resolve("acme", "gone").version


def test_local_lock_survives_its_file_being_collected(tmp_path):
    """A writer that opened a lock file the GC then unlinked must not hold a lock on a ghost file: it
    re-opens the new one (so two writers never both hold one key's lock)."""
    import fcntl

    backend = LocalBackend(tmp_path / "store")
    path = backend._path("a/k.json")
    with backend._locked(path):
        lock = path.parent / ".lock-k.json"
        assert lock.exists()
        # The GC only collects a lock file it can flock itself: a held one is skipped.
        old = time.time() - 2 * GRACE
        os.utime(lock, (old, old))
        assert backend.remove_stale_lock_files(GRACE) == (0, 0)
    assert backend.remove_stale_lock_files(GRACE) == (1, 0) and not lock.exists()
    with backend._locked(path):
        fd = os.open(lock, os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)


def test_cli_store_gc_dry_run_and_run(tmp_path, capsys):
    from softserve.cli import main

    backend = LocalBackend(tmp_path / "store")
    backend.put(keys.blob("0" * 64), blob(3))
    age_all(backend)
    assert main(["store", "gc", "--store", str(tmp_path / "store"), "--dry-run"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["dry_run"] and out["blobs_deleted"] == 1 and backend.exists(keys.blob("0" * 64))
    assert main(["store", "gc", "--store", str(tmp_path / "store"), "--grace-seconds", "60"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["objects_deleted"] == 1 and out["bytes_freed"] == len(blob(3))
    assert not backend.exists(keys.blob("0" * 64))


@pytest.mark.process
def test_gc_on_s3(seaweed):
    """The same on a real S3 server (LastModified from ListObjectsV2, HeadObject before each delete)."""
    from softserve.store.backends.s3 import S3Backend

    backend = S3Backend(seaweed.bucket, f"gc-tests/{uuid.uuid4().hex[:16]}", client=seaweed.client())
    store = PromptStore(backend, MODEL)
    live, _ = store.put("acme", "p", blob(1), CFG)
    shared, _ = store.put("beta", "p", blob(1), CFG)
    backend.put(keys.blob("0" * 64), blob(3))
    time.sleep(2.2)  # S3 times have one-second resolution
    backend.put(keys.blob("1" * 64), blob(4))
    young = backend.info(keys.blob("1" * 64))
    report = collect_garbage(backend, 1.5, now=young.mtime + 0.5)
    assert (report.blobs_deleted, report.blobs_young, report.blobs_referenced) == (1, 1, 1)
    assert not backend.exists(keys.blob("0" * 64)) and backend.exists(keys.blob("1" * 64))
    assert store.load_tensor(live).shape == (4, H) and shared.sha256 == live.sha256


@pytest.mark.process
@pytest.mark.parametrize("gc_runs", ["after_finding_the_blob", "after_rewriting_the_blob"])
def test_upload_reusing_an_old_blob_while_gc_runs_on_s3(seaweed, gc_runs):
    """The re-used-old-blob race on a real S3 server: the GC runs (grace 2 s) inside B's upload."""
    from softserve.store.backends.s3 import S3Backend

    runs = []

    class Racy(S3Backend):
        def put(self, key, data, *, if_absent=False):
            wrote = super().put(key, data, if_absent=if_absent)
            if keys.blob_sha(key) is not None and not runs and (
                (gc_runs == "after_finding_the_blob" and if_absent and not wrote)
                or (gc_runs == "after_rewriting_the_blob" and not if_absent)
            ):
                runs.append(collect_garbage(self, 2.0))
            return wrote

    backend = Racy(seaweed.bucket, f"gc-race/{uuid.uuid4().hex[:16]}", client=seaweed.client())
    store = PromptStore(backend, MODEL)
    old, _ = store.put("acme", "old", blob(7), CFG)
    store.delete("acme", "old")
    time.sleep(3.2)  # older than the grace period (S3 times have one-second resolution)
    new, _ = store.put("beta", "new", blob(7), CFG)
    assert len(runs) == 1 and new.sha256 == old.sha256
    assert backend.info(keys.blob(new.sha256)) is not None
    assert store.load_tensor(store.resolve("beta", "new")).shape == (4, H)


def test_server_runs_gc_periodically_and_counts_it_in_metrics(tiny_model, tokenizer, tmp_path):
    from fastapi.testclient import TestClient

    from softserve.service.runtime import LoadedModel
    from softserve.app import create_app
    from softserve.config import Settings

    assert Settings().store_gc_interval_seconds == 0  # off unless asked for: one replica (or cron) is enough
    backend = LocalBackend(tmp_path / "store")
    backend.put(keys.blob("0" * 64), blob(3))
    age_all(backend)
    settings = Settings(store=str(tmp_path / "store"), max_model_len=256, store_gc_interval_seconds=0.2,
                        store_gc_grace_seconds=60)
    with TestClient(create_app(settings, loaded=LoadedModel(tiny_model, tokenizer, "tiny"))) as c:
        deadline = time.monotonic() + 30
        while "softserve_store_gc_objects_total 1.0" not in (text := c.get("/metrics").text):
            assert time.monotonic() < deadline, "the periodic GC never ran (or did not count it)"
            time.sleep(0.1)
        assert not backend.exists(keys.blob("0" * 64))
        assert f"softserve_store_gc_bytes_total {float(len(blob(3)))}" in text


@pytest.mark.parametrize("kind", ["memory", "local"])
def test_upload_adopting_an_old_leftover_manifest_while_gc_runs(tmp_path, kind):
    """A crash left a blob and a version manifest without a head; later the same tensor is uploaded to the
    same name (the upload adopts the manifest) while a GC runs: the manifest the new head lists survives."""
    base = MemoryBackend if kind == "memory" else LocalBackend
    runs = []

    class Racy(base):
        def put(self, key, data, *, if_absent=False):
            wrote = super().put(key, data, if_absent=if_absent)
            if "/versions/" in key and if_absent and not wrote and not runs:
                runs.append(collect_garbage(self, GRACE))
            return wrote

    backend = Racy() if kind == "memory" else Racy(tmp_path / "s")
    store = PromptStore(backend, MODEL)
    first, _ = store.put("acme", "p", blob(1), CFG)
    backend.delete(keys.prompt_head("acme", "p"))  # as if killed before its head write
    age_all(backend)
    again, _ = store.put("acme", "p", blob(1), CFG)
    assert len(runs) == 1 and runs[0].manifests_deleted == 1  # the GC did take the leftover meanwhile
    assert again.version == first.version
    assert backend.exists(keys.prompt_version("acme", "p", again.version))
    assert store.resolve("acme", "p", again.version[:8]).sha256 == again.sha256
    assert store.load_tensor(again).shape == (4, H)
