"""The Batch API in process over a tiny model: results, order, bad lines, cancel, limits, tenants."""

from __future__ import annotations

import json
import time

from fastapi.testclient import TestClient

from tests.batch.conftest import completion_line, jsonl, make_api, read_lines, upload, wait_batch


def test_batch_answers_every_line_like_the_endpoint_in_input_order(api):
    h = api.h["a"]
    prompts = [f"Ticket {i}: the printer is on fire" + " again" * (i % 5) for i in range(12)]
    lines = [completion_line(f"t-{i}", p, max_tokens=3 + i % 4) for i, p in enumerate(prompts)]
    lines.insert(3, {"custom_id": "chat-1", "method": "POST", "url": "/v1/chat/completions", "body": {}})  # wrong url
    file_id = upload(api, h, jsonl(lines))
    resp = api.post("/v1/batches", headers=h, json={"input_file_id": file_id, "endpoint": "/v1/completions",
                                                    "completion_window": "24h", "metadata": {"job": "retag"}})
    assert resp.status_code == 200, resp.text
    batch = resp.json()
    assert batch["object"] == "batch" and batch["status"] == "validating" and batch["metadata"] == {"job": "retag"}
    batch = wait_batch(api, h, batch["id"])
    assert batch["status"] == "completed", batch
    assert batch["request_counts"] == {"total": 13, "completed": 12, "failed": 1}
    out = read_lines(api, h, batch["output_file_id"])
    assert [o["custom_id"] for o in out] == [f"t-{i}" for i in range(12)]  # input order
    for i, o in enumerate(out):
        solo = api.post("/v1/completions", headers=h, json=lines[i if i < 3 else i + 1]["body"]).json()
        assert o["response"]["status_code"] == 200 and o["error"] is None
        assert o["response"]["body"]["choices"][0]["text"] == solo["choices"][0]["text"]
        assert o["response"]["body"]["usage"] == solo["usage"]
    errors = read_lines(api, h, batch["error_file_id"])
    assert [(e["custom_id"], e["error"]["line"], e["error"]["code"]) for e in errors] == [("chat-1", 4, "invalid_url")]


def test_bad_lines_land_in_the_error_file_with_their_line_number(api):
    h = api.h["a"]
    raw = [
        completion_line("ok-1", "Hello"),
        "{not json",
        json.dumps(completion_line("ok-1", "duplicate id")),
        "",  # blank lines are skipped but still counted in line numbers
        json.dumps({"method": "POST", "url": "/v1/completions", "body": {"model": "tiny-llama", "prompt": "x"}}),
        completion_line("bad-param", "Hi", max_tokens=-3),
        completion_line("unknown-field", "Hi", frobnicate=1),
        completion_line("no-model", "Hi", model="no-such-prompt"),
        completion_line("stream", "Hi", stream=True),
        completion_line("too-long", "word " * 400),
        completion_line("ok-2", "World"),
    ]
    file_id = upload(api, h, jsonl(raw))
    batch = api.post("/v1/batches", headers=h, json={"input_file_id": file_id, "endpoint": "/v1/completions",
                                                     "completion_window": "24h"}).json()
    batch = wait_batch(api, h, batch["id"])
    assert batch["status"] == "completed" and batch["request_counts"] == {"total": 10, "completed": 2, "failed": 8}
    assert [o["custom_id"] for o in read_lines(api, h, batch["output_file_id"])] == ["ok-1", "ok-2"]
    errors = {e["error"]["line"]: e for e in read_lines(api, h, batch["error_file_id"])}
    assert sorted(errors) == [2, 3, 5, 6, 7, 8, 9, 10]
    assert errors[2]["error"]["code"] == "invalid_json" and errors[2]["response"] is None
    assert errors[3]["error"]["code"] == "duplicate_custom_id"
    assert errors[5]["error"]["code"] == "missing_custom_id"
    assert "max_tokens" in errors[6]["error"]["message"] and "line 6" in errors[6]["error"]["message"]
    assert "frobnicate" in errors[7]["error"]["message"]
    assert errors[8]["response"]["status_code"] == 404 and errors[8]["error"]["code"] == "model_not_found"
    assert "stream" in errors[9]["error"]["message"]
    assert errors[10]["response"]["status_code"] == 400 and errors[10]["error"]["code"] == "context_length_exceeded"


def test_a_batch_of_only_bad_lines_fails_and_says_why(api):
    h = api.h["a"]
    file_id = upload(api, h, jsonl(["{oops", "[1, 2]"]))
    batch = api.post("/v1/batches", headers=h, json={"input_file_id": file_id, "endpoint": "/v1/completions"}).json()
    batch = wait_batch(api, h, batch["id"])
    assert batch["status"] == "failed" and batch["failed_at"]
    assert [(e["line"], e["code"]) for e in batch["errors"]["data"]] == [(1, "invalid_json"), (2, "invalid_request")]
    assert [e["error"]["line"] for e in read_lines(api, h, batch["error_file_id"])] == [1, 2]


def test_cancel_stops_the_batch_and_keeps_what_is_done(api):
    h = api.h["a"]
    lines = [completion_line(f"c-{i}", f"Row {i}", max_tokens=60, ignore_eos=True) for i in range(400)]
    batch = api.post("/v1/batches", headers=h, json={"input_file_id": upload(api, h, jsonl(lines)),
                                                     "endpoint": "/v1/completions"}).json()
    wait_batch(api, h, batch["id"], statuses=("in_progress",))
    resp = api.post(f"/v1/batches/{batch['id']}/cancel", headers=h)
    assert resp.status_code == 200 and resp.json()["status"] in ("cancelling", "cancelled")
    batch = wait_batch(api, h, batch["id"])
    assert batch["status"] == "cancelled" and batch["cancelled_at"] and batch["cancelling_at"]
    done = batch["request_counts"]["completed"]
    assert done < 400
    out = read_lines(api, h, batch["output_file_id"])
    assert [o["custom_id"] for o in out] == [f"c-{i}" for i in range(done)]  # a prefix, in order
    again = api.post(f"/v1/batches/{batch['id']}/cancel", headers=h)  # idempotent
    assert again.status_code == 200 and again.json()["status"] == "cancelled"
    # The lines in flight were aborted: the engine empties within a step or two, nothing keeps running.
    engine = api.app.state.service.engine
    deadline = time.monotonic() + 5
    while engine.num_running + engine.num_waiting and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.num_running == 0 and engine.num_waiting == 0


def test_list_is_paged_newest_first(api):
    h = api.h["a"]
    file_id = upload(api, h, jsonl([completion_line("x", "Hi", max_tokens=1)]))
    ids = [api.post("/v1/batches", headers=h, json={"input_file_id": file_id, "endpoint": "/v1/completions"}).json()["id"]
           for _ in range(3)]
    for batch_id in ids:
        wait_batch(api, h, batch_id)
    page = api.get("/v1/batches?limit=2", headers=h).json()
    assert page["object"] == "list" and page["has_more"] is True and len(page["data"]) == 2
    rest = api.get(f"/v1/batches?limit=2&after={page['last_id']}", headers=h).json()
    assert rest["has_more"] is False
    assert sorted(b["id"] for b in page["data"] + rest["data"]) == sorted(ids)
    resp = api.post(f"/v1/batches/{ids[0]}/cancel", headers=h)
    assert resp.status_code == 409 and resp.json()["error"]["code"] == "batch_finished"  # completed: too late


def test_tenant_isolation_on_every_route(api):
    a, b = api.h["a"], api.h["b"]
    file_id = upload(api, a, jsonl([completion_line("x", "Hi", max_tokens=2)]))
    batch = api.post("/v1/batches", headers=a, json={"input_file_id": file_id, "endpoint": "/v1/completions"}).json()
    batch = wait_batch(api, a, batch["id"])
    out_id = batch["output_file_id"]
    # Another tenant sees none of it: 404 like a missing one, and nothing listed.
    assert api.post("/v1/batches", headers=b, json={"input_file_id": file_id, "endpoint": "/v1/completions"}).status_code == 404
    assert api.get(f"/v1/batches/{batch['id']}", headers=b).status_code == 404
    assert api.post(f"/v1/batches/{batch['id']}/cancel", headers=b).status_code == 404
    assert api.get("/v1/batches", headers=b).json()["data"] == []
    for fid in (file_id, out_id):
        assert api.get(f"/v1/files/{fid}", headers=b).status_code == 404
        assert api.get(f"/v1/files/{fid}/content", headers=b).status_code == 404
    assert all(f["id"] not in (file_id, out_id) for f in api.get("/v1/files", headers=b).json()["data"])
    assert api.get(f"/v1/batches/{batch['id']}").status_code == 401  # no key
    # A line naming another tenant's prompt is a 404 line, as the endpoint would answer.
    blob = __import__("tests.support.prompts", fromlist=["blob"]).blob(1, k=4)
    assert api.put("/v1/prompts/secret", headers=a, files={"adapter_model": ("p.safetensors", blob)}).status_code == 201
    file_b = upload(api, b, jsonl([completion_line("steal", "Hi", model="secret"), completion_line("own", "Hi")]))
    batch_b = api.post("/v1/batches", headers=b, json={"input_file_id": file_b, "endpoint": "/v1/completions"}).json()
    batch_b = wait_batch(api, b, batch_b["id"])
    assert [e["response"]["status_code"] for e in read_lines(api, b, batch_b["error_file_id"])] == [404]
    assert [o["custom_id"] for o in read_lines(api, b, batch_b["output_file_id"])] == ["own"]


def test_limits(tiny_model, tokenizer, tmp_path):
    app, keys = make_api(tiny_model, tokenizer, tmp_path, max_batches_per_tenant=1, max_batch_requests=3)
    with TestClient(app) as api:
        h = {"Authorization": f"Bearer {keys['a']}"}
        too_many = upload(api, h, jsonl([completion_line(f"x{i}", "Hi") for i in range(4)]))
        resp = api.post("/v1/batches", headers=h, json={"input_file_id": too_many, "endpoint": "/v1/completions"})
        assert resp.status_code == 400 and resp.json()["error"]["code"] == "too_many_requests"
        tune = upload(api, h, jsonl([{"prompt": "a", "completion": "b"}]), purpose="tune")
        resp = api.post("/v1/batches", headers=h, json={"input_file_id": tune, "endpoint": "/v1/completions"})
        assert resp.status_code == 400 and resp.json()["error"]["param"] == "input_file_id"
        resp = api.post("/v1/batches", headers=h, json={"input_file_id": tune, "endpoint": "/v1/embeddings"})
        assert resp.status_code == 400
        slow = upload(api, h, jsonl([completion_line(f"s{i}", "Hi", max_tokens=60, ignore_eos=True) for i in range(3)]))
        first = api.post("/v1/batches", headers=h, json={"input_file_id": slow, "endpoint": "/v1/completions"}).json()
        resp = api.post("/v1/batches", headers=h, json={"input_file_id": slow, "endpoint": "/v1/completions"})
        if wait_batch(api, h, first["id"], statuses=("validating", "in_progress", "completed"))["status"] != "completed":
            assert resp.status_code == 429 and resp.json()["error"]["code"] == "batch_limit"
        wait_batch(api, h, first["id"])
        second = api.post("/v1/batches", headers=h, json={"input_file_id": slow, "endpoint": "/v1/completions"})
        assert second.status_code == 200  # a finished batch no longer counts


def test_create_request_accepts_exactly_the_endpoints_and_windows_the_runner_serves():
    """The request model spells its Literals out (mypy cannot read them from a tuple): they must stay
    the runner's ENDPOINTS and COMPLETION_WINDOWS."""
    from typing import get_args

    from softserve.batch.lines import ENDPOINTS
    from softserve.batch.records import COMPLETION_WINDOWS
    from softserve.service.batches import BatchCreateRequest

    fields = BatchCreateRequest.model_fields
    assert set(get_args(fields["endpoint"].annotation)) == set(ENDPOINTS)
    assert set(get_args(fields["completion_window"].annotation)) == set(COMPLETION_WINDOWS)


def test_a_lines_priority_reaches_the_engine_as_a_background_rows_priority(api, monkeypatch):
    # The scheduler orders a tenant's own batch rows by it (tests/engine/test_scheduler.py); out of
    # range is a line error, like on the endpoint.
    from softserve.engine.scheduler import Scheduler

    seen: list[tuple[str, int, bool]] = []
    add = Scheduler.add

    def recording_add(self, request):
        seen.append((request.request_id, request.priority, request.background))
        return add(self, request)

    monkeypatch.setattr(Scheduler, "add", recording_add)
    h = api.h["a"]
    lines = [completion_line("low", "one", priority=7), completion_line("urgent", "two", priority=-3),
             completion_line("bad", "three", priority=5000)]
    file_id = upload(api, h, jsonl(lines))
    batch = api.post("/v1/batches", headers=h, json={"input_file_id": file_id, "endpoint": "/v1/completions",
                                                     "completion_window": "24h"}).json()
    batch = wait_batch(api, h, batch["id"])
    assert batch["request_counts"] == {"total": 3, "completed": 2, "failed": 1}
    assert sorted((priority, background) for _, priority, background in seen) == [(-3, True), (7, True)]
    errors = read_lines(api, h, batch["error_file_id"])
    assert [(e["custom_id"], e["error"]["line"]) for e in errors] == [("bad", 3)]
