"""The `softserve` command line against a live tiny-model server: keys, prompts push/list/pull/rm."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from live_server import TINY_HIDDEN, LiveServer, adapter_config, prompt_bytes, tiny_model_dir


def softserve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "server", *args], capture_output=True, text=True, timeout=120)


def test_keys_add_prints_a_key_once_and_stores_only_its_hash(tmp_path):
    keys = tmp_path / "keys.yaml"
    result = softserve("keys", "add", "--tenant", "acme", "--file", str(keys))
    assert result.returncode == 0, result.stderr
    key = result.stdout.strip()
    assert key.startswith("sk-ss-") and key not in keys.read_text()
    from server.service.auth import ApiKeyRegistry

    principal = ApiKeyRegistry.load(keys).authenticate(f"Bearer {key}")
    assert principal is not None and principal.tenant == "acme" and not principal.is_admin


def test_prompts_push_list_pull_rm(tmp_path, tmp_path_factory, tokenizer):
    model_dir = tiny_model_dir(tmp_path_factory, tokenizer)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(prompt_bytes(7, 5, TINY_HIDDEN))
    (adapter / "adapter_config.json").write_bytes(adapter_config(5))
    with LiveServer(tmp_path / "store", model=model_dir) as server:
        url = ["--url", server.url]
        pushed = softserve("prompts", *url, "push", str(adapter), "--name", "cli-task", "--description", "from the CLI")
        assert pushed.returncode == 0, pushed.stderr
        version = json.loads(pushed.stdout)["version"]
        listed = softserve("prompts", *url, "list")
        assert listed.returncode == 0 and "cli-task" in listed.stdout and version in listed.stdout
        out = tmp_path / "pulled"
        pulled = softserve("prompts", *url, "pull", "cli-task", str(out))
        assert pulled.returncode == 0, pulled.stderr
        assert (out / "adapter_model.safetensors").exists() and json.loads((out / "adapter_config.json").read_text())["num_virtual_tokens"] == 5
        assert softserve("prompts", *url, "rm", "cli-task").returncode == 0
        missing = softserve("prompts", *url, "rm", "cli-task")
        assert missing.returncode != 0 and "404" in missing.stderr


@pytest.mark.parametrize("argv", [["serve", "--help"], ["prompts", "--help"], ["keys", "add", "--help"]])
def test_help_texts(argv):
    result = softserve(*argv)
    assert result.returncode == 0 and "usage:" in result.stdout
