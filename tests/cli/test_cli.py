"""The `softserve` command line against a live tiny-model server: keys, prompts push/list/pull/rm/alias, eval."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.support.live_server import TINY_HIDDEN, LiveServer, adapter_config, prompt_bytes, tiny_model_dir

pytestmark = pytest.mark.process


def softserve(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SOFTSERVE_")}
    return subprocess.run([sys.executable, "-m", "softserve", *args], capture_output=True, text=True, timeout=120,
                          env={**clean, **(env or {})})


@pytest.fixture(scope="module")
def server(tmp_path_factory, tokenizer):
    from softserve.service.auth import add_key

    root = tmp_path_factory.mktemp("cli")
    keys = root / "keys.yaml"
    key = add_key(keys, "acme")
    with LiveServer(root / "store", model=tiny_model_dir(tmp_path_factory, tokenizer), api_keys=keys) as srv:
        srv.key = key
        yield srv


@pytest.fixture
def adapter(tmp_path):
    directory = tmp_path / "adapter"
    directory.mkdir()
    (directory / "adapter_model.safetensors").write_bytes(prompt_bytes(7, 5, TINY_HIDDEN))
    (directory / "adapter_config.json").write_bytes(adapter_config(5))
    return directory


def test_keys_add_prints_a_key_once_and_stores_only_its_hash(tmp_path):
    keys = tmp_path / "keys.yaml"
    result = softserve("keys", "add", "--tenant", "acme", "--file", str(keys))
    assert result.returncode == 0, result.stderr
    key = result.stdout.strip()
    assert key.startswith("sk-ss-") and key not in keys.read_text()
    from softserve.service.auth import ApiKeyRegistry

    principal = ApiKeyRegistry.load(keys).authenticate(f"Bearer {key}")
    assert principal is not None and principal.tenant == "acme" and not principal.is_admin


def test_keys_add_file_from_the_environment(tmp_path):
    keys = tmp_path / "env-keys.yaml"
    result = softserve("keys", "add", "--tenant", "acme", env={"SOFTSERVE_API_KEYS": str(keys)})
    assert result.returncode == 0, result.stderr
    assert keys.exists() and result.stdout.strip() not in keys.read_text()


def test_prompts_push_list_pull_rm(server, adapter, tmp_path):
    url = ["--url", server.url, "--api-key", server.key]
    pushed = softserve("prompts", *url, "push", str(adapter), "--name", "cli-task", "--description", "from the CLI")
    assert pushed.returncode == 0, pushed.stderr
    info = json.loads(pushed.stdout)
    assert info["name"] == "cli-task" and info["description"] == "from the CLI" and info["warnings"] == []
    listed = softserve("prompts", *url, "list")
    assert listed.returncode == 0 and "cli-task" in listed.stdout and info["version"] in listed.stdout
    assert "k=5" in listed.stdout
    out = tmp_path / "pulled"
    pulled = softserve("prompts", *url, "pull", "cli-task", str(out))
    assert pulled.returncode == 0, pulled.stderr
    assert pulled.stdout.strip() == f"wrote PEFT adapter to {out}"
    assert (out / "adapter_model.safetensors").read_bytes() == (adapter / "adapter_model.safetensors").read_bytes()
    assert json.loads((out / "adapter_config.json").read_text())["num_virtual_tokens"] == 5
    removed = softserve("prompts", *url, "rm", "cli-task")
    assert removed.returncode == 0 and removed.stdout.strip() == "deleted cli-task"
    missing = softserve("prompts", *url, "rm", "cli-task")
    assert missing.returncode != 0 and "error 404:" in missing.stderr and "cli-task" in missing.stderr


def test_prompts_alias_set_list_history_rm(server, adapter, tmp_path):
    url = ["--url", server.url, "--api-key", server.key]
    v1 = json.loads(softserve("prompts", *url, "push", str(adapter), "--name", "rel").stdout)["version"]
    (adapter / "adapter_model.safetensors").write_bytes(prompt_bytes(8, 5, TINY_HIDDEN))
    v2 = json.loads(softserve("prompts", *url, "push", str(adapter), "--name", "rel").stdout)["version"]
    put = softserve("prompts", *url, "alias", "set", "rel", "prod", v1[:8])
    assert put.returncode == 0, put.stderr
    assert put.stdout.split() == ["rel@prod", f"{v1}=1"]
    split = softserve("prompts", *url, "alias", "set", "rel", "prod", "--split", f"{v1}=90", f"{v2}=10")
    assert split.returncode == 0 and split.stdout.split() == ["rel@prod", f"{v1}=90", f"{v2}=10"], split.stderr
    listed = softserve("prompts", *url, "alias", "list", "rel")
    assert listed.returncode == 0 and listed.stdout.split() == ["rel@prod", f"{v1}=90", f"{v2}=10"]
    history = softserve("prompts", *url, "alias", "history", "rel", "prod").stdout.splitlines()
    assert len(history) == 2 and history[0].endswith(f"- -> {v1}=1") and "acme:key-" in history[1]
    assert history[1].endswith(f"{v1}=1 -> {v1}=90,{v2}=10")
    busy = softserve("prompts", *url, "rm", "rel")
    assert busy.returncode != 0 and "error 409:" in busy.stderr and "rel@prod" in busy.stderr
    bad = softserve("prompts", *url, "alias", "set", "rel", "prod", "--split", "nope")
    assert bad.returncode != 0 and "VERSION=WEIGHT" in bad.stderr
    hexy = softserve("prompts", *url, "alias", "set", "rel", "cafe", v1)
    assert hexy.returncode != 0 and "error 400:" in hexy.stderr
    removed = softserve("prompts", *url, "alias", "rm", "rel", "prod")
    assert removed.returncode == 0 and removed.stdout.strip() == "deleted rel@prod"
    assert softserve("prompts", *url, "alias", "list", "rel").stdout == ""
    assert softserve("prompts", *url, "rm", "rel").returncode == 0


def test_prompts_url_and_key_from_the_environment(server, adapter):
    env = {"SOFTSERVE_URL": server.url, "SOFTSERVE_API_KEY": server.key}
    pushed = softserve("prompts", "push", str(adapter / "adapter_model.safetensors"), "--name", "env-task", env=env)
    assert pushed.returncode == 0, pushed.stderr
    listed = softserve("prompts", "list", env=env)
    assert listed.returncode == 0 and "env-task" in listed.stdout
    no_key = softserve("prompts", "list", env={"SOFTSERVE_URL": server.url})
    assert no_key.returncode != 0 and "error 401:" in no_key.stderr


def test_push_of_a_directory_without_the_adapter_file_says_so(server, tmp_path):
    result = softserve("prompts", "--url", server.url, "--api-key", server.key, "push", str(tmp_path), "--name", "x")
    assert result.returncode != 0 and "adapter_model.safetensors not found" in result.stderr


def test_eval_against_the_server_equals_the_library(server, adapter, tmp_path):
    from softserve.client import Client
    from softserve.evaluation import evaluate, load_eval_data

    url = ["--url", server.url, "--api-key", server.key]
    assert softserve("prompts", *url, "push", str(adapter), "--name", "eval-task").returncode == 0
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in [
        {"prompt": "Review: I loved it.\nSentiment:", "choices": [" positive", " negative"], "answer": 0},
        {"prompt": "Q: 2 + 2 =", "choices": [" 4", " 5", " 22"], "answer": 0},
        {"prompt": "Say:", "completion": " hello"},
    ]))
    result = softserve("eval", *url, "--model", "eval-task", "--data", str(data), "--max-tokens", "3")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    with Client(server.url, api_key=server.key) as client:
        expected = evaluate(client, "eval-task", load_eval_data(data), max_tokens=3).summary()
    assert summary == {"model": "eval-task", "data": str(data), **expected} and summary["total"] == 3
    missing = softserve("eval", *url, "--model", "no-such-prompt", "--data", str(data))
    assert missing.returncode != 0 and "server answered 404" in missing.stderr


@pytest.mark.parametrize("argv", [["serve", "--help"], ["prompts", "--help"], ["keys", "add", "--help"]])
def test_help_texts(argv):
    result = softserve(*argv)
    assert result.returncode == 0 and "usage:" in result.stdout
