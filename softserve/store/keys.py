"""Every key the store's backend holds, built in one place (see LAYOUT.md, "Keys").

Whoever writes into the backend (the prompt store, uploaded training files, tuning jobs, the
garbage collector, the usage ledger) builds its keys here, so LAYOUT.md can list every keyspace and
the GC can tell them apart. The strings are the on-disk format: changing one orphans existing stores.
"""

from __future__ import annotations

import re
from typing import NamedTuple

__all__ = [
    "BLOBS_PREFIX", "TENANTS_PREFIX", "ACTIVE_JOBS_PREFIX", "PROBE_PREFIX",
    "blob", "blob_sha", "prompts_prefix", "prompt_head", "prompt_version", "alias_history_prefix", "alias_history",
    "files_prefix", "file_data", "file_meta",
    "jobs_prefix", "job_prefix", "job_record", "job_data", "job_events", "job_checkpoint", "job_lease",
    "active_job", "active_job_id", "usage", "index_prefix", "index_manifest", "index_shard",
    "TenantKey", "parse_tenant_key",
    "FINISHED_JOBS_PREFIX", "FINISHED_INDEX_READY", "job_checkpoints_prefix", "finished_job", "FinishedJobKey",
    "parse_finished_job", "is_generated_id", "is_job_data",
    "ACTIVE_BATCHES_PREFIX", "batches_prefix", "batch_prefix", "batch_record", "batch_input",
    "batch_chunk", "batch_chunks_prefix", "batch_lease", "active_batch", "active_batch_id",
    "FINISHED_BATCHES_PREFIX", "FINISHED_BATCHES_INDEX_READY", "finished_batch", "FinishedBatchKey",
    "parse_finished_batch",
]

BLOBS_PREFIX = "blobs/sha256/"
TENANTS_PREFIX = "tenants/"
ACTIVE_JOBS_PREFIX = "tuning/active/"
PROBE_PREFIX = "_softserve/"  # S3Backend.check_conditional_writes() writes and deletes one object here

_BLOB_SUFFIX = ".safetensors"
_GENERATED_ID_BODY = re.compile(r"[0-9a-z]{1,64}")  # ASCII only: str.isalnum() also takes "²" and "٣"


def is_generated_id(value: object, prefix: str) -> bool:
    """Could `value` be an id we generated (`file-...`, `tunejob-...`)? Anything else (Unicode digits,
    a 1,000-character id) would make an invalid key: the caller answers 404 without asking the store."""
    return (isinstance(value, str) and value.startswith(prefix)
            and _GENERATED_ID_BODY.fullmatch(value, len(prefix)) is not None)


# ---- content-addressed tensors (shared by every tenant and name) --------------------------------
def blob(sha256: str) -> str:
    return f"{BLOBS_PREFIX}{sha256}{_BLOB_SUFFIX}"


def blob_sha(key: str) -> str | None:
    """The sha256 of a blob key, or None if `key` is not one."""
    if key.startswith(BLOBS_PREFIX) and key.endswith(_BLOB_SUFFIX):
        sha = key[len(BLOBS_PREFIX):-len(_BLOB_SUFFIX)]
        return sha if sha and "/" not in sha else None
    return None


# ---- prompts ----------------------------------------------------------------------------------------
def prompts_prefix(tenant: str) -> str:
    return f"{TENANTS_PREFIX}{tenant}/prompts/"


def prompt_head(tenant: str, name: str) -> str:
    return f"{prompts_prefix(tenant)}{name}/head.json"


def prompt_version(tenant: str, name: str, version: str) -> str:
    return f"{prompts_prefix(tenant)}{name}/versions/{version}.json"


def alias_history_prefix(tenant: str, name: str) -> str:
    """Every archived alias change of a name (softserve/store/aliases.py), all epochs."""
    return f"{prompts_prefix(tenant)}{name}/alias-history/"


def alias_history(tenant: str, name: str, epoch: str, seq: int) -> str:
    return f"{alias_history_prefix(tenant, name)}{epoch}/{seq:010d}.json"


# ---- uploaded training files (softserve/tuning/files.py) ----------------------------------------------
def files_prefix(tenant: str) -> str:
    return f"{TENANTS_PREFIX}{tenant}/files/"


def file_data(tenant: str, file_id: str) -> str:
    return f"{files_prefix(tenant)}{file_id}.jsonl"


def file_meta(tenant: str, file_id: str) -> str:
    return f"{files_prefix(tenant)}{file_id}.json"


# ---- tuning jobs (softserve/tuning/persist.py) ---------------------------------------------------------
def jobs_prefix(tenant: str) -> str:
    return f"{TENANTS_PREFIX}{tenant}/tuning/jobs/"


def job_prefix(tenant: str, job_id: str) -> str:
    return f"{jobs_prefix(tenant)}{job_id}/"


def job_record(tenant: str, job_id: str) -> str:
    return f"{job_prefix(tenant, job_id)}record.json"


def job_data(tenant: str, job_id: str, which: str) -> str:
    return f"{job_prefix(tenant, job_id)}data/{which}.jsonl"


def is_job_data(key: str) -> bool:
    """Is `key` a job_data() key (a tuning job's copy of its training or validation data)?"""
    parsed = parse_tenant_key(key)
    return (parsed is not None and parsed.kind == "job" and key.endswith(".jsonl")
            and key.rsplit("/", 2)[-2] == "data")


def job_events(tenant: str, job_id: str, first_seq: int) -> str:
    return f"{job_prefix(tenant, job_id)}events/{first_seq:010d}.jsonl"


def job_checkpoint(tenant: str, job_id: str, step: int) -> str:
    return f"{job_prefix(tenant, job_id)}checkpoints/{step:010d}.safetensors"


def job_lease(tenant: str, job_id: str) -> str:
    return f"{job_prefix(tenant, job_id)}lease.json"


def job_checkpoints_prefix(tenant: str, job_id: str) -> str:
    """Every `job_checkpoint` of one job (its resume state, deleted when the job finishes)."""
    return f"{job_prefix(tenant, job_id)}checkpoints/"


def active_job(job_id: str) -> str:
    return f"{ACTIVE_JOBS_PREFIX}{job_id}.json"


def active_job_id(key: str) -> str | None:
    if key.startswith(ACTIVE_JOBS_PREFIX) and key.endswith(".json"):
        return key[len(ACTIVE_JOBS_PREFIX):-len(".json")] or None
    return None


# ---- finished tuning jobs, by the time they finished (the retention sweep lists only these) -----------
FINISHED_JOBS_PREFIX = "tuning/finished/"
FINISHED_INDEX_READY = "tuning/finished-index.json"  # written once every job finished before the index has a key


def finished_job(tenant: str, job_id: str, finished_at: float) -> str:
    return f"{FINISHED_JOBS_PREFIX}{tenant}/{job_id}-{int(finished_at):010d}.json"


class FinishedJobKey(NamedTuple):
    tenant: str
    job_id: str
    finished_at: int


def parse_finished_job(key: str) -> FinishedJobKey | None:
    parsed = _parse_finished(FINISHED_JOBS_PREFIX, key)
    return None if parsed is None else FinishedJobKey(*parsed)


def _parse_finished(prefix: str, key: str) -> tuple[str, str, int] | None:
    """`<prefix><tenant>/<id>-<finished_at>.json` -> (tenant, id, finished_at)."""
    if not key.startswith(prefix) or not key.endswith(".json"):
        return None
    parts = key[len(prefix):-len(".json")].split("/")
    if len(parts) != 2:
        return None
    name, _, when = parts[1].rpartition("-")
    if not parts[0] or not name or not when.isdigit():
        return None
    return parts[0], name, int(when)


# ---- batches (softserve/batch/persist.py) ----------------------------------------------------------------
ACTIVE_BATCHES_PREFIX = "batches/active/"


def batches_prefix(tenant: str) -> str:
    return f"{TENANTS_PREFIX}{tenant}/batches/"


def batch_prefix(tenant: str, batch_id: str) -> str:
    return f"{batches_prefix(tenant)}{batch_id}/"


def batch_record(tenant: str, batch_id: str) -> str:
    return f"{batch_prefix(tenant, batch_id)}record.json"


def batch_input(tenant: str, batch_id: str) -> str:
    return f"{batch_prefix(tenant, batch_id)}input.jsonl"


def batch_chunk(tenant: str, batch_id: str, kind: str, first_line: int, run: int) -> str:
    """Results of input lines first_line.. (kind "output" or "error") written by run number `run`, before
    the record lists them: a replica that lost the batch writes only keys nobody lists."""
    return f"{batch_prefix(tenant, batch_id)}{kind}/{first_line:010d}-{run:06d}.jsonl"


def batch_chunks_prefix(tenant: str, batch_id: str, kind: str) -> str:
    return f"{batch_prefix(tenant, batch_id)}{kind}/"


def batch_lease(tenant: str, batch_id: str) -> str:
    return f"{batch_prefix(tenant, batch_id)}lease.json"


def active_batch(batch_id: str) -> str:
    return f"{ACTIVE_BATCHES_PREFIX}{batch_id}.json"


def active_batch_id(key: str) -> str | None:
    if key.startswith(ACTIVE_BATCHES_PREFIX) and key.endswith(".json"):
        return key[len(ACTIVE_BATCHES_PREFIX):-len(".json")] or None
    return None


# ---- finished batches, by the time they finished (the retention sweep lists only these) ---------------
FINISHED_BATCHES_PREFIX = "batches/finished/"
FINISHED_BATCHES_INDEX_READY = "batches/finished-index.json"  # written once batches finished before the index have a key


def finished_batch(tenant: str, batch_id: str, finished_at: float) -> str:
    return f"{FINISHED_BATCHES_PREFIX}{tenant}/{batch_id}-{int(finished_at):010d}.json"


class FinishedBatchKey(NamedTuple):
    tenant: str
    batch_id: str
    finished_at: int


def parse_finished_batch(key: str) -> FinishedBatchKey | None:
    parsed = _parse_finished(FINISHED_BATCHES_PREFIX, key)
    return None if parsed is None else FinishedBatchKey(*parsed)


# ---- per-tenant storage usage (softserve/store/usage.py) ----------------------------------------------
def usage(tenant: str) -> str:
    return f"{TENANTS_PREFIX}{tenant}/usage.json"


# ---- the per-tenant listing index (softserve/store/index.py) -----------------------------------------
def index_prefix(tenant: str) -> str:
    return f"{TENANTS_PREFIX}{tenant}/index/"


def index_manifest(tenant: str) -> str:
    return f"{index_prefix(tenant)}manifest.json"


def index_shard(tenant: str, shard: int) -> str:
    return f"{index_prefix(tenant)}{shard:02d}.json"


# ---- parsing (the garbage collector and the usage rebuild walk `tenants/`) --------------------------
class TenantKey(NamedTuple):
    """A key under `tenants/<tenant>/`: kind is "head", "version", "alias_history", "file_data", "file_meta", "usage",
    "job" (anything of a tuning job), "batch" (anything of a batch), "index" (the listing index) or "other";
    `name`/`version` are set for prompt keys, `name` is the file id for file keys, the job id for job keys, the
    batch id for batch keys and the file name
    ("manifest.json", "07.json") for index keys."""

    tenant: str
    kind: str
    name: str | None = None
    version: str | None = None


def parse_tenant_key(key: str) -> TenantKey | None:
    if not key.startswith(TENANTS_PREFIX):
        return None
    parts = key[len(TENANTS_PREFIX):].split("/")
    tenant = parts[0]
    rest = parts[1:]
    if rest == ["usage.json"]:
        return TenantKey(tenant, "usage")
    if len(rest) == 3 and rest[0] == "prompts" and rest[2] == "head.json":
        return TenantKey(tenant, "head", rest[1])
    if len(rest) == 4 and rest[0] == "prompts" and rest[2] == "versions" and rest[3].endswith(".json"):
        return TenantKey(tenant, "version", rest[1], rest[3][:-len(".json")])
    if len(rest) == 5 and rest[0] == "prompts" and rest[2] == "alias-history":
        return TenantKey(tenant, "alias_history", rest[1])
    if len(rest) == 2 and rest[0] == "files":
        if rest[1].endswith(".jsonl"):
            return TenantKey(tenant, "file_data", rest[1][:-len(".jsonl")])
        if rest[1].endswith(".json"):
            return TenantKey(tenant, "file_meta", rest[1][:-len(".json")])
    if len(rest) == 2 and rest[0] == "index":
        return TenantKey(tenant, "index", rest[1])
    if len(rest) >= 4 and rest[0] == "tuning" and rest[1] == "jobs":
        return TenantKey(tenant, "job", rest[2])
    if len(rest) >= 3 and rest[0] == "batches":
        return TenantKey(tenant, "batch", rest[1])
    return TenantKey(tenant, "other")
