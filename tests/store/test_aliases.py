"""Release aliases in the store: grammar, splits, atomic moves on several replicas (memory, local, real
S3 on SeaweedFS), history, refusal to delete an aliased name, and split assignment."""

from __future__ import annotations

import itertools
import uuid

import pytest

from softserve.store import aliases, keys
from softserve.store.backends import LocalBackend, MemoryBackend
from softserve.store.store import PromptStore
from softserve.store.types import PromptNotFound, PromptStoreError, PromptValidationError
from tests.support.concurrency import run_together
from tests.support.prompts import CFG, MODEL, blob


@pytest.fixture(params=["memory", "local", pytest.param("s3", marks=pytest.mark.process)])
def make_store(request, tmp_path):
    """Each call is a new PromptStore on a new backend instance over the same data: another replica."""
    if request.param == "memory":
        shared = MemoryBackend()
        return lambda: PromptStore(shared, MODEL)
    if request.param == "local":
        return lambda: PromptStore(LocalBackend(tmp_path / "d"), MODEL)
    seaweed = request.getfixturevalue("seaweed")
    from softserve.store.backends.s3 import S3Backend

    prefix = f"alias-tests/{uuid.uuid4().hex[:16]}"
    return lambda: PromptStore(S3Backend(seaweed.bucket, prefix, client=seaweed.client()), MODEL)


def _versions(store: PromptStore, n: int, name: str = "task") -> list[str]:
    return [store.put("acme", name, blob(seed), CFG)[0].version for seed in range(1, n + 1)]


@pytest.mark.parametrize("label", ["prod", "canary", "v2-rc_1", "g", "x123abc"])
def test_alias_grammar_accepts(label):
    assert aliases.validate_alias(label) == label and aliases.is_alias_label(label)


@pytest.mark.parametrize("label", ["abc123", "deadbeef", "cafe", "3f2a9c1b0d4e", "Prod", "1prod", "", "a" * 33,
                                   "pr od", "prod/x", "prod@x", "-x"])
def test_alias_grammar_refuses_what_could_be_a_version_or_is_malformed(label):
    with pytest.raises(PromptValidationError):
        aliases.validate_alias(label)


def test_hex_labels_are_versions():
    # Every version id and every prefix `resolve` accepts is hex: never read as an alias.
    assert not aliases.is_alias_label("3f2a9c1b0d4e") and not aliases.is_alias_label("3F2A9C")


def test_set_list_move_history_delete(make_store):
    store = make_store()
    v1, v2 = _versions(store, 2)
    record, change = aliases.set_alias(store, "acme", "task", "prod", [(v1[:6], 1)], by="acme:key-1")
    assert record.versions == (v1,) and change.before is None and change.seq == 1  # a prefix resolves to the full id
    aliases.set_alias(store, "acme", "task", "prod", [(v1, 90), (v2, 10)], by="acme:key-2")
    aliases.set_alias(store, "acme", "task", "canary", [(v2, 1)], by="acme:key-1")
    assert [a.name for a in aliases.list_aliases(store, "acme", "task")] == ["canary", "prod"]
    assert aliases.get_alias(store, "acme", "task", "prod").arms == (aliases.Arm(v1, 90.0), aliases.Arm(v2, 10.0))
    aliases.delete_alias(store, "acme", "task", "canary", by="acme:key-3")
    history = aliases.history(make_store(), "acme", "task")  # another replica reads the same history
    assert [(c.seq, c.alias, c.by) for c in history] == [(1, "prod", "acme:key-1"), (2, "prod", "acme:key-2"),
                                                         (3, "canary", "acme:key-1"), (4, "canary", "acme:key-3")]
    assert history[1].before == (aliases.Arm(v1, 1.0),) and history[1].after == (aliases.Arm(v1, 90.0), aliases.Arm(v2, 10.0))
    assert history[3].after is None and all(c.at > 0 for c in history)
    assert [c.seq for c in aliases.history(store, "acme", "task", "prod")] == [1, 2]
    with pytest.raises(PromptNotFound):
        aliases.get_alias(store, "acme", "task", "canary")


def test_an_upload_keeps_the_aliases(make_store):
    store = make_store()
    (v1,) = _versions(store, 1)
    aliases.set_alias(store, "acme", "task", "prod", [(v1, 1)])
    v3 = store.put("acme", "task", blob(3), CFG)[0].version
    assert store.resolve("acme", "task").version == v3
    assert aliases.get_alias(store, "acme", "task", "prod").versions == (v1,)


@pytest.mark.parametrize("split, code", [
    ([], "invalid_split"),
    ([("V1", -1.0)], "invalid_split"),
    ([("V1", 0.0)], "invalid_split"),
    ([("V1", float("nan"))], "invalid_split"),
    ([("V1", 1.0), ("V1", 1.0)], "invalid_split"),
    ([("V1", 1.0)] * 9, "invalid_split"),
])
def test_split_validation(split, code):
    store = PromptStore(MemoryBackend(), MODEL)
    (v1,) = _versions(store, 1)
    with pytest.raises(PromptValidationError) as err:
        aliases.set_alias(store, "acme", "task", "prod", [(v1 if v == "V1" else v, w) for v, w in split])
    assert err.value.code == code
    with pytest.raises(PromptNotFound):
        aliases.list_aliases(store, "acme", "nope")
    with pytest.raises(PromptNotFound):  # a version the name does not have
        aliases.set_alias(store, "acme", "task", "prod", [("0123456789ab", 1)])
    assert aliases.list_aliases(store, "acme", "task") == []


def test_eight_arms_with_zero_weights_are_accepted_and_never_picked():
    store = PromptStore(MemoryBackend(), MODEL)
    versions = _versions(store, 8)
    record, _ = aliases.set_alias(store, "acme", "task", "prod", [(v, 1.0 if i == 3 else 0.0) for i, v in enumerate(versions)])
    assert {record.pick(aliases.assignment_point("s", str(k))).version for k in range(500)} == {versions[3]}


def test_deleting_an_aliased_name_is_refused_and_never_dangles(make_store):
    store = make_store()
    (v1,) = _versions(store, 1)
    aliases.set_alias(store, "acme", "task", "prod", [(v1, 1)])
    with pytest.raises(PromptStoreError) as err:
        store.delete("acme", "task")
    assert (err.value.status_code, err.value.code) == (409, "alias_in_use") and "task@prod" in err.value.message
    assert store.resolve("acme", "task", v1).version == v1  # nothing was deleted
    aliases.delete_alias(store, "acme", "task", "prod")
    store.delete("acme", "task")
    assert store.backend.list(keys.alias_history_prefix("acme", "task")) == []  # the history went with the name
    store.put("acme", "task", blob(1), CFG)
    assert aliases.history(store, "acme", "task") == []  # a re-created name starts a new history


def test_concurrent_moves_from_two_replicas_never_lose_a_write_or_dangle(make_store):
    """Two replicas move one alias (and a second one) at once while a third uploads: every move lands in
    the history with a distinct seq, and the alias always names versions the head has."""
    writer = make_store()
    versions = _versions(writer, 4)
    replicas = [make_store(), make_store()]
    rounds = 6

    def mover(i: int):
        def run():
            for r in range(rounds):
                store = replicas[i]
                aliases.set_alias(store, "acme", "task", "prod", [(versions[(i + r) % 4], 1), (versions[(i + r + 1) % 4], 1)],
                                  by=f"replica-{i}")
                aliases.set_alias(store, "acme", "task", f"r{i}", [(versions[r % 4], 1)], by=f"replica-{i}")
        return run

    def uploader():
        for seed in range(10, 14):
            writer.put("acme", "task", blob(seed), CFG)

    assert run_together([mover(0), mover(1), uploader]) == []
    reader = make_store()
    history = aliases.history(reader, "acme", "task")
    assert [c.seq for c in history] == list(range(1, 4 * rounds + 1))  # no move lost, none twice
    assert sorted(c.by for c in history) == ["replica-0"] * 2 * rounds + ["replica-1"] * 2 * rounds
    live = set(reader.versions("acme", "task")[i].version for i in range(len(reader.versions("acme", "task"))))
    assert len(live) == 8  # every upload landed too
    for record in aliases.list_aliases(reader, "acme", "task"):
        for version in record.versions:
            assert version in live and reader.resolve("acme", "task", version).version == version
    # the last change of each alias is what the alias says now
    for record in aliases.list_aliases(reader, "acme", "task"):
        last = [c for c in history if c.alias == record.name][-1]
        assert last.after == record.arms


def test_delete_racing_alias_set_never_leaves_a_dangling_alias(make_store):
    """Either the delete wins (the alias write then finds no prompt) or the alias does (the delete is a 409)."""
    for attempt in range(4):
        store = make_store()
        name = f"race{attempt}"
        (v1,) = _versions(store, 1, name)
        raised = run_together([lambda: store.delete("acme", name),
                               lambda: aliases.set_alias(make_store(), "acme", name, "prod", [(v1, 1)])])
        assert len(raised) == 1, raised
        reader = make_store()
        if isinstance(raised[0], PromptNotFound):  # the delete won: no head, so no alias either
            with pytest.raises(PromptNotFound):
                aliases.list_aliases(reader, "acme", name)
        else:
            assert raised[0].code == "alias_in_use"
            (record,) = aliases.list_aliases(reader, "acme", name)
            assert reader.resolve("acme", name, record.versions[0]).version == v1


def test_split_assignment_converges_to_the_weights_and_is_stable_across_replicas():
    backend = MemoryBackend()
    store = PromptStore(backend, MODEL)
    versions = _versions(store, 3)
    aliases.set_alias(store, "acme", "task", "prod", [(versions[0], 70), (versions[1], 20), (versions[2], 10)])
    scope = "acme/task@prod"
    one, other = (aliases.get_alias(PromptStore(backend, MODEL), "acme", "task", "prod") for _ in range(2))
    picks = [one.pick(aliases.assignment_point(scope, f"user-{k}")).version for k in range(10_000)]
    shares = [picks.count(v) / len(picks) for v in versions]
    assert all(abs(share - want) <= 0.02 for share, want in zip(shares, (0.7, 0.2, 0.1))), shares
    again = [other.pick(aliases.assignment_point(scope, f"user-{k}")).version for k in range(10_000)]
    assert again == picks  # the same key lands on the same version on every replica
    # without a key: random, still by the weights
    free = [one.pick(aliases.assignment_point(scope, None)).version for _ in range(10_000)]
    assert abs(free.count(versions[0]) / 10_000 - 0.7) <= 0.02
    # another alias (scope) shuffles keys independently: not the same users always get the canary
    shifted = [one.pick(aliases.assignment_point("acme/task@beta", f"user-{k}")).version for k in range(10_000)]
    assert shifted != picks


def test_history_survives_many_changes_across_archive_and_head():
    store = PromptStore(MemoryBackend(), MODEL)
    v1, v2 = _versions(store, 2)
    for i, v in zip(range(30), itertools.cycle([v1, v2])):
        aliases.set_alias(store, "acme", "task", "prod", [(v, 1)], by=f"u{i}")
    history = aliases.history(store, "acme", "task")
    assert [c.by for c in history] == [f"u{i}" for i in range(30)]
    assert all(history[i].after == history[i + 1].before for i in range(29))


def test_alias_history_keys_are_parsed():
    key = keys.alias_history("acme", "task", "e1", 7)
    assert keys.parse_tenant_key(key) == keys.TenantKey("acme", "alias_history", "task")


def test_serving_an_older_arm_reads_its_manifest_once_per_revalidation_window():
    class Counting(MemoryBackend):
        reads: list[str] = []

        def get(self, key):
            self.reads.append(key)
            return super().get(key)

    backend = Counting()
    writer = PromptStore(backend, MODEL)
    v1, _ = _versions(writer, 2)
    store = PromptStore(backend, MODEL, revalidate_seconds=60)
    backend.reads.clear()
    for _ in range(50):
        assert store.resolve("acme", "task", v1).version == v1
    assert backend.reads.count(keys.prompt_version("acme", "task", v1)) == 1
    uncached = PromptStore(backend, MODEL)  # revalidate_seconds 0: every resolution reads the backend
    for _ in range(3):
        uncached.resolve("acme", "task", v1)
    assert backend.reads.count(keys.prompt_version("acme", "task", v1)) == 4
