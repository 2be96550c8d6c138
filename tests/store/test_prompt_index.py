"""The per-tenant listing index (softserve/store/index.py): it equals the heads after every kind of write,
concurrent writers (threads, and two PromptStore "replicas" on one backend) never lose an entry, a writer
that dies between its head write and its index update is repaired by the GC without listing ever failing,
an old store without an index lists correctly, and GET /v1/prompts pages over it (limit/after/has_more)."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from softserve.store import index as index_mod
from softserve.store import keys
from softserve.store.backends import LocalBackend, MemoryBackend
from softserve.store.gc import collect_garbage
from softserve.store.index import SHARDS, listing_record, shard_of
from softserve.store.store import PromptStore
from softserve.store.types import PromptNotFound
from softserve.api import deps
from softserve.api.errors import install_error_handlers
from softserve.api.prompts import router as prompts_router
from softserve.client import AsyncClient, Client
from softserve.service.auth import ApiKeyRegistry, add_key
from tests.support.concurrency import run_together
from tests.support.prompts import CFG, MODEL, blob

GRACE = 3600.0


@pytest.fixture(params=["memory", "local"])
def backend(request, tmp_path):
    return MemoryBackend() if request.param == "memory" else LocalBackend(tmp_path / "store")


def index_entries(store: PromptStore, tenant: str) -> dict[str, dict]:
    shards = store.index.read_shards(tenant)
    assert shards is not None, "the index is not complete"
    return {name: rec for entries in shards for name, rec in entries.items()}


def head_entries(store: PromptStore, tenant: str) -> dict[str, dict]:
    """The truth: every head's latest version, read from the heads themselves."""
    return {m.name: listing_record(m) for m in store.index.walk(tenant)}


def assert_index_matches_heads(store: PromptStore, tenant: str) -> None:
    truth = head_entries(store, tenant)
    assert index_entries(store, tenant) == truth
    listed = store.list(tenant)
    assert [m.name for m in listed] == sorted(truth)
    assert {m.name: listing_record(m) for m in listed} == truth


class CountingBackend:
    """Delegates to a backend; counts reads of head keys, and can fail or slow down index writes."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.head_reads = 0
        self.fail_index_writes = False
        self.index_read_delay = 0.0
        self.cas_conflicts = 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def get(self, key):
        if key.endswith("/head.json"):
            self.head_reads += 1
        return self.inner.get(key)

    def get_with_etag(self, key):
        if key.endswith("/head.json"):
            self.head_reads += 1
        out = self.inner.get_with_etag(key)
        if "/index/" in key and self.index_read_delay:
            time.sleep(self.index_read_delay)  # widen the read-modify-write window: writers interleave
        return out

    def put(self, key, data, *, if_absent=False):
        if "/index/" in key and self.fail_index_writes:
            raise OSError("injected: index write failed")
        return self.inner.put(key, data, if_absent=if_absent)

    def put_if_match(self, key, data, etag):
        if "/index/" in key and self.fail_index_writes:
            raise OSError("injected: index write failed")
        ok = self.inner.put_if_match(key, data, etag)
        if not ok and "/index/" in key:
            self.cas_conflicts += 1
        return ok

    def delete_if_match(self, key, etag):
        return self.inner.delete_if_match(key, etag)


# ---- the index equals the heads -----------------------------------------------------------------------
def test_index_equals_heads_after_puts_deletes_and_reuploads(backend):
    store = PromptStore(backend, MODEL)
    v1, _ = store.put("acme", "greeter", blob(1), CFG, "first")
    assert store.index.read_shards("acme") is None  # built by the first listing, then kept by every write
    store.list("acme")
    assert_index_matches_heads(store, "acme")
    store.put("acme", "greeter", blob(2), CFG, "second")  # new version: the entry follows the head
    assert index_entries(store, "acme")["greeter"]["description"] == "second"
    for i in range(12):
        store.put("acme", f"p{i:02d}", blob(100 + i), CFG)
    assert_index_matches_heads(store, "acme")
    store.put("acme", "greeter", blob(1), CFG)  # re-upload of v1 = rollback: v1 is the latest again
    assert index_entries(store, "acme")["greeter"]["version"] == v1.version
    assert index_entries(store, "acme")["greeter"]["description"] == "first"
    store.delete("acme", "p03")
    store.delete("acme", "greeter")
    assert "greeter" not in index_entries(store, "acme")
    assert_index_matches_heads(store, "acme")
    store.put("acme", "greeter", blob(3), CFG, "reborn")  # a deleted name uploaded again
    assert_index_matches_heads(store, "acme")
    for i in range(12):
        store.delete("acme", f"p{i:02d}") if i != 3 else None
    store.delete("acme", "greeter")
    assert store.list("acme") == [] and index_entries(store, "acme") == {}


def test_listing_reads_no_head_once_the_index_exists(backend):
    counting = CountingBackend(backend)
    store = PromptStore(counting, MODEL)
    for i in range(40):
        store.put("acme", f"p{i:02d}", blob(i), CFG)
    store.list("acme")
    counting.head_reads = 0
    listed = store.list("acme")
    assert len(listed) == 40 and counting.head_reads == 0
    # the metas equal the heads' latest (adapter_config is not part of a listing record)
    for m in listed:
        assert m == store.resolve("acme", m.name)


def test_an_update_applied_late_still_ends_with_the_newest_head(backend):
    """Replica A writes a head, replica B writes a newer head of the same name and its index update,
    then A's (delayed) index update runs: it re-reads the head, so the entry stays B's."""
    a, b = PromptStore(backend, MODEL), PromptStore(backend, MODEL)
    a.put("acme", "x", blob(1), CFG)
    b.list("acme")  # build the index
    delayed = []
    a.index.updated = lambda tenant, name: delayed.append((tenant, name))  # A's update is held back
    a.put("acme", "x", blob(2), CFG, "from A")
    newest, _ = b.put("acme", "x", blob(3), CFG, "from B")
    ListingIndexOf(a).updated(*delayed[0])
    assert index_entries(b, "acme")["x"]["version"] == newest.version
    assert_index_matches_heads(b, "acme")


def ListingIndexOf(store: PromptStore):
    return index_mod.ListingIndex(store.backend)


# ---- concurrent writers ---------------------------------------------------------------------------------
def same_shard_names(count: int, shard: int) -> list[str]:
    """Names that all land in one shard: every writer below contends for the same index object."""
    out, i = [], 0
    while len(out) < count:
        if shard_of(f"w{i}") == shard:
            out.append(f"w{i}")
        i += 1
    return out


@pytest.mark.parametrize("replicas", [1, 3])
def test_concurrent_writers_never_lose_an_entry(backend, replicas):
    counting = CountingBackend(backend)
    counting.index_read_delay = 0.002
    stores = [PromptStore(counting, MODEL) for _ in range(replicas)]
    stores[0].put("acme", "seed", blob(999), CFG)
    stores[0].list("acme")  # the index exists, so every writer below updates it
    names = same_shard_names(36, shard_of("seed"))
    per_writer = [names[t::6] for t in range(6)]

    def writer(t: int) -> None:
        store = stores[t % replicas]
        for i, name in enumerate(per_writer[t]):
            store.put("acme", name, blob(1000 + t * 100 + i), CFG)
            if i % 3 == 2:
                store.delete("acme", per_writer[t][i - 1])

    assert run_together(lambda t=t: writer(t) for t in range(6)) == []
    deleted = {w[i] for w in per_writer for i in (1, 4)}
    expected = {"seed"} | set(names) - deleted
    reader = PromptStore(backend, MODEL)  # another replica, without any pending state
    assert {m.name for m in reader.list("acme")} == expected
    assert_index_matches_heads(reader, "acme")
    if replicas > 1:
        assert counting.cas_conflicts > 0  # the replicas really raced on the shard (and retried)


# ---- a crash between the head write and the index write ------------------------------------------------
def test_a_writer_killed_before_its_index_update_is_repaired_by_the_gc(backend):
    writer, reader = PromptStore(backend, MODEL), PromptStore(backend, MODEL)
    writer.put("acme", "kept", blob(1), CFG)
    writer.put("acme", "doomed", blob(2), CFG)
    reader.list("acme")
    writer.index.updated = lambda tenant, name: None  # "killed" right after each head write
    writer.put("acme", "lost", blob(3), CFG)
    writer.put("acme", "kept", blob(4), CFG, "v2")
    writer.delete("acme", "doomed")
    stale = {m.name: m for m in reader.list("acme")}  # listing works, but lags the heads
    assert set(stale) == {"kept", "doomed"} and stale["kept"].description is None
    assert collect_garbage(backend, GRACE, dry_run=True).indexes_repaired == ["acme"]
    assert {m.name for m in reader.list("acme")} == {"kept", "doomed"}  # a dry run writes nothing
    report = collect_garbage(backend, GRACE)
    assert report.indexes_repaired == ["acme"] and report.indexes_built == []
    assert_index_matches_heads(reader, "acme")
    assert {m.name for m in reader.list("acme")} == {"kept", "lost"}
    assert collect_garbage(backend, GRACE).indexes_repaired == []  # nothing left to repair


def test_deleting_a_ghost_entry_removes_it(backend):
    store = PromptStore(backend, MODEL)
    store.put("acme", "ghost", blob(1), CFG)
    store.list("acme")
    backend.delete(keys.prompt_head("acme", "ghost"))  # the head is gone, the index entry not (a crash)
    assert [m.name for m in PromptStore(backend, MODEL).list("acme")] == ["ghost"]
    with pytest.raises(PromptNotFound):
        store.delete("acme", "ghost")
    assert store.list("acme") == []


def test_a_failing_index_write_never_breaks_listing(backend):
    counting = CountingBackend(backend)
    store = PromptStore(counting, MODEL)
    store.put("acme", "a", blob(1), CFG)
    store.list("acme")
    counting.fail_index_writes = True
    store.put("acme", "b", blob(2), CFG)  # the upload itself succeeds
    store.delete("acme", "a")
    # This process knows its updates are missing: it lists from the heads instead (correct, slower).
    assert [m.name for m in store.list("acme")] == ["b"]
    # Another replica lists the stale index until the GC (or this process's retry) repairs it.
    assert [m.name for m in PromptStore(backend, MODEL).list("acme")] == ["a"]
    counting.fail_index_writes = False
    assert [m.name for m in store.list("acme")] == ["b"]  # the pending updates were applied first
    assert_index_matches_heads(PromptStore(backend, MODEL), "acme")


# ---- stores without an index -------------------------------------------------------------------------------
def drop_index(backend, tenant: str) -> None:
    for key in backend.list(keys.index_prefix(tenant)):
        backend.delete(key)


def test_an_old_store_without_index_lists_correctly_and_gets_one(backend):
    store = PromptStore(backend, MODEL)
    for i in range(10):
        store.put("acme", f"p{i}", blob(i), CFG, f"d{i}")
    store.put("beta", "other", blob(50), CFG)
    drop_index(backend, "acme")
    drop_index(backend, "beta")
    fresh = PromptStore(backend, MODEL)
    fresh.put("acme", "new", blob(77), CFG)  # a new replica writes into the old store: shard absent, skipped
    listed = fresh.list("acme")  # builds the index by one walk
    assert [m.name for m in listed] == sorted([f"p{i}" for i in range(10)] + ["new"])
    assert backend.exists(keys.index_manifest("acme"))
    assert_index_matches_heads(fresh, "acme")
    report = collect_garbage(backend, GRACE)  # the GC builds what is still missing
    assert report.indexes_built == ["beta"]
    assert [m.name for m in fresh.list("beta")] == ["other"]


def test_a_damaged_index_is_rebuilt_not_trusted(backend):
    store = PromptStore(backend, MODEL)
    for i in range(20):
        store.put("acme", f"p{i:02d}", blob(i), CFG)
    store.list("acme")
    victim = shard_of("p05")
    backend.delete(keys.index_shard("acme", victim))  # one shard lost
    assert [m.name for m in PromptStore(backend, MODEL).list("acme")] == [f"p{i:02d}" for i in range(20)]
    assert_index_matches_heads(store, "acme")
    backend.put(keys.index_manifest("acme"), json.dumps({"shards": SHARDS * 2}).encode())  # another layout
    assert len(PromptStore(backend, MODEL).list("acme")) == 20


def test_a_tenant_without_prompts_writes_no_index(backend):
    store = PromptStore(backend, MODEL)
    assert store.list("nobody") == []
    assert backend.list(keys.index_prefix("nobody")) == []


def test_index_keys_are_not_tenant_data_to_the_gc(backend):
    store = PromptStore(backend, MODEL)
    store.put("acme", "p", blob(1), CFG)
    store.list("acme")
    before = set(backend.list(keys.index_prefix("acme")))
    assert len(before) == SHARDS + 1
    collect_garbage(backend, 0.0)
    assert set(backend.list(keys.index_prefix("acme"))) == before
    assert keys.parse_tenant_key(keys.index_shard("acme", 3)).kind == "index"


# ---- GET /v1/prompts pages -----------------------------------------------------------------------------------
class Api:
    def __init__(self, tmp_path) -> None:
        keyfile = tmp_path / "keys.yaml"
        self.keys = {"a": add_key(keyfile, "acme"), "admin": add_key(keyfile, "acme", role="admin"),
                     "b": add_key(keyfile, "beta"), "pub": add_key(keyfile, "public", role="admin")}
        registry = ApiKeyRegistry.load(keyfile)
        self.store = PromptStore(LocalBackend(tmp_path / "data"), MODEL)
        self.app = FastAPI()
        install_error_handlers(self.app)
        self.app.include_router(prompts_router)
        self.app.dependency_overrides[deps.get_store] = lambda: self.store
        self.app.dependency_overrides[deps.get_cache] = lambda: None
        self.app.dependency_overrides[deps.get_registry] = lambda: registry
        self.client = TestClient(self.app)

    def h(self, who: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[who]}"}

    def get(self, who: str, **params):
        return self.client.get("/v1/prompts", params=params, headers=self.h(who))


@pytest.fixture
def api(tmp_path) -> Api:
    env = Api(tmp_path)
    for i, name in enumerate(["delta", "alpha", "echo", "charlie", "bravo"]):
        env.store.put("acme", name, blob(i), CFG)
    for i, name in enumerate(["zulu", "ab", "mike"]):
        env.store.put("public", name, blob(50 + i), CFG)
    for i, name in enumerate(["beta-only", "secret"]):
        env.store.put("beta", name, blob(80 + i), CFG)
    return env


ACME_ORDER = ["alpha", "bravo", "charlie", "delta", "echo", "public/ab", "public/mike", "public/zulu"]


def walk_pages(api: Api, who: str, limit: int) -> list[dict]:
    pages, after = [], None
    while True:
        params = {"limit": limit} | ({"after": after} if after else {})
        body = api.get(who, **params).json()
        pages.append(body)
        if not body["has_more"]:
            return pages
        after = body["last_id"]


def test_default_listing_is_everything_in_order(api):
    body = api.get("a").json()
    assert [p["id"] for p in body["data"]] == ACME_ORDER  # own names sorted, then public ones sorted
    assert body["has_more"] is False and body["first_id"] == "alpha" and body["last_id"] == "public/zulu"
    assert [p["public"] for p in body["data"]] == [False] * 5 + [True] * 3


@pytest.mark.parametrize("limit", [1, 2, 3, 5, 7, 8])
def test_pages_cover_the_listing_once(api, limit):
    pages = walk_pages(api, "a", limit)
    ids = [p["id"] for page in pages for p in page["data"]]
    assert ids == ACME_ORDER
    assert all(len(page["data"]) == limit for page in pages[:-1])
    for page in pages:
        assert page["first_id"] == page["data"][0]["id"] and page["last_id"] == page["data"][-1]["id"]
    assert [page["has_more"] for page in pages] == [True] * (len(pages) - 1) + [False]


def test_a_cursor_survives_the_deletion_of_its_prompt(api):
    first = api.get("a", limit=3).json()
    assert first["last_id"] == "charlie"
    api.store.delete("acme", "charlie")
    rest = api.get("a", after="charlie").json()
    assert [p["id"] for p in rest["data"]] == ACME_ORDER[3:]
    assert [p["id"] for p in api.get("a", after="public/aa").json()["data"]] == ACME_ORDER[5:]
    assert api.get("a", after="public/zz").json() == {"object": "list", "data": [], "has_more": False,
                                                      "first_id": None, "last_id": None}


def test_bad_page_parameters_are_400(api):
    for params in ({"limit": 0}, {"limit": 10_001}, {"after": "beta/x"}, {"after": "a/b/c"}, {"after": "-bad"}):
        r = api.get("a", **params)
        assert r.status_code == 400, params
        assert r.json()["error"]["param"] in ("limit", "after")


def test_pages_never_show_another_tenant(api):
    for limit in (1, 2, 100):
        ids = [p["id"] for page in walk_pages(api, "b", limit) for p in page["data"]]
        assert ids == ["beta-only", "secret", "public/ab", "public/mike", "public/zulu"]
    ids = [p["id"] for page in walk_pages(api, "a", 1) for p in page["data"]]
    assert "secret" not in ids and "beta-only" not in ids
    # the public tenant itself sees its names bare, once
    assert [p["id"] for page in walk_pages(api, "pub", 2) for p in page["data"]] == ["ab", "mike", "zulu"]
    assert [p["id"] for p in api.get("pub", after="public/ab").json()["data"]] == ["mike", "zulu"]


def test_clients_iterate_every_page(api):
    with Client("http://testserver", api_key=api.keys["a"], http_client=api.client) as client:
        assert [p.id for p in client.prompts.list(page_size=2)] == ACME_ORDER
        assert [p.id for p in client.prompts.list()] == ACME_ORDER
        page = client.prompts.list_page(limit=3)
        assert page.has_more and page.last_id == "charlie"

    async def run() -> list[str]:
        transport = httpx.ASGITransport(app=api.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
            async with AsyncClient("http://testserver", api_key=api.keys["a"], http_client=http) as client:
                return [p.id for p in await client.prompts.list(page_size=3)]

    assert asyncio.run(run()) == ACME_ORDER


def test_sixteen_replicas_uploading_at_once_all_succeed(tmp_path):
    """16 store objects on one directory upload at once: no upload ends in a 409 from the usage record's or
    the index's compare-and-swap loop (a fixed retry sleep made colliding writers retry in lock-step), and
    the index and the usage record both count every prompt."""
    backend = LocalBackend(tmp_path / "store")
    stores = [PromptStore(LocalBackend(tmp_path / "store"), MODEL) for _ in range(16)]
    stores[0].put("acme", "seed", blob(0), CFG)
    stores[0].list("acme")

    def work(w: int) -> None:
        for i in range(w, 320, 16):
            stores[w].put("acme", f"n{i:03d}", blob(10_000 + i), CFG)

    assert run_together(lambda w=w: work(w) for w in range(16)) == []
    reader = PromptStore(backend, MODEL)
    assert len(reader.list("acme")) == 321
    assert_index_matches_heads(reader, "acme")
    assert reader.usage.get("acme").prompts == 321
