"""Smoke test of bench/: every script runs in --quick mode on a tiny model and prints its tables.

No timing assertions (the machine is shared); this only proves the scripts, their JSON and
run_all's report rendering work. Sizes are cut below --quick's to keep the whole test well under 60 s.
"""

from __future__ import annotations

import contextlib
import io
import json

import pytest

QUICK = ["--quick", "--model", "tiny", "--threads", "1"]
CASES = {
    "roofline": (["--batch", "1,2", "--steps", "2", "--matmul-n", "256"], ["### Roofline", "| batch | seq | engine ms/step"]),
    "baselines": (["--batch", "2", "--max-tokens", "4", "--seq-requests", "1"],
                  ["### Baselines", "| configuration | output tok/s", "(i) PEFT sequential"]),
    "load": (["--concurrency", "2", "--warmup", "0.3", "--window", "1", "--num-prompts", "4"],
             ["### Heterogeneity tax", "| C | (a) one prompt | (b) C distinct prompts", "| C | config | TTFT p50 ms"]),
    "prefix_cache": (["--k", "8", "--batch", "1", "--repeats", "1"], ["### Prompt KV prefix cache", "| k | rows | cache on ms"]),
    "prompt_scale": (["--num-prompts", "20", "--cold-requests", "2", "--warmup", "0.3", "--window", "1"],
                     ["### Prompt scale", "`GET /v1/prompts`", "| working set | output tok/s",
                      "every upload's KV in the disk tier (warm-ups done / failed / dropped) | ", "(20 / 0 / 0)"]),
    "dtype": (["--num-prompts", "2", "--max-tokens", "4", "--batch", "1,2"], ["### dtype", "| batch | fp32 tok/s | bf16 tok/s"]),
    "engine_speed": (["--context", "8"], ["### Engine speed: attention path and dtype", "| decode C=2 | step |", "greedy agreement"]),
    "guided_cost": (["--concurrency", "2", "--steps", "2"], ["### Guided decoding cost", "| rows constrained | output tok/s"]),
    "tuning_speed": (["--steps", "2", "--batch-size", "2"], ["tuning speed", "| ours (PromptTuner) |", "| PEFT loop |", "ratio ours/PEFT"]),
    "tuning_accuracy": (["--datasets", "sentiment"],
                        ["| sentiment | base + instruction |", "| prefix tuning + projection |", "first-line match"]),
    "listing": (["--num-prompts", "40", "--rounds", "1", "--puts", "2"],
                ["### Listing 40 prompts", "| measurement | walk (before) ms | index ms"]),
    "batch_step_shape": ([], ["### Step shape", "| + 1-token batch chunk |", "| + 2-token batch chunk |"]),
    "batch": (["--requests", "16", "--num-prompts", "2", "--probes", "2", "--concurrency", "2"],
              ["### Batch API", "| Batch API alone (create to completed)", "| run-batch offline",
               "| Batch API while those probes ran"]),
    "releases": (["--calls", "20", "--hidden", "64"], ["### Resolving `model` through a release alias", "| reference | µs per resolution"]),
    "loop_overhead": (["--concurrency", "2", "--warmup", "0.3", "--window", "1", "--max-tokens", "4", "--k", "4"],
                      ["### Serving overhead around the forward", "| variant | tok/s", "| engine alone |", "| live |"]),
    "contention": ([], ["### Contention: the HTTP side's work as a thread vs a process", "| 25% |"]),
    "startup": (["--dtype", "float32"], ["### Start-up until /ready", "| compiled, empty inductor cache |", "| compiled, warm inductor cache |"]),
    "step_time": ([], ["### Engine step time", "| decode, 4 rows |", "| mixed, 1 x 8-token prefill + 3 decode |"]),
    "small_linear": (["--rows", "1,4"], ["### Small-row bf16 linears", "| rows | F.linear ms | oneDNN packed ms | ours ms"]),
    "native_attention": ([], ["### Packed attention per layer call", "| 16 decode rows (kv 110) |"]),
    # on CPU: the padded steps run eagerly in place of the graphs, no profile (it reads CUDA kernels)
    "gpu_engine": (["--device", "cpu", "--steps", "2"], ["### tiny", "| rows | reference | packed | graphs |", "waves: one_prompt"]),
    "adapter_kinds": (["--concurrency", "3", "--k", "4", "--prompt-tokens", "8", "--max-tokens", "4", "--repeats", "1"],
                      ["### Adapter kinds in one batch", "| rows | output tok/s | ratio to plain", "| prefix_tuning |"]),
}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """Runs a script once per module (its JSON and printed tables), whichever test asks first, so every
    test here also passes alone or in any order."""
    out_dir = tmp_path_factory.mktemp("bench")
    done: dict[str, tuple[dict, str]] = {}

    def run(name: str) -> tuple[dict, str]:
        if name not in done:
            import importlib

            extra, _ = CASES[name]
            printed = io.StringIO()
            with contextlib.redirect_stdout(printed):
                result = importlib.import_module(f"bench.{name}").main([*QUICK, *extra, "--json", str(out_dir / f"{name}.json")])
            done[name] = result, printed.getvalue()
        return done[name]

    run.out_dir = out_dir
    return run


SERVER_SCRIPTS = {"load", "prompt_scale", "batch", "loop_overhead", "startup", "step_time"}  # they start a subprocess
# (`softserve serve`; step_time: its measuring worker)
# 13-25 s each on 2 cores: run with `pytest -m slow` (make test-all), so `make test` stays near 10 minutes.
# `load` stays in make test: test_run_all_renders needs its results anyway.
SLOW_SCRIPTS = {"prompt_scale", "batch", "loop_overhead", "startup"}  # startup: four starts, two compiles


def _marks(name: str) -> list:
    return ([pytest.mark.process] if name in SERVER_SCRIPTS else []) + ([pytest.mark.slow] if name in SLOW_SCRIPTS else [])


@pytest.mark.parametrize("name", [pytest.param(n, marks=_marks(n)) for n in CASES])
def test_script_quick(name, quick_run):
    if name == "native_attention":
        from softserve.engine import native_kernels

        if not native_kernels.load():
            pytest.skip("the native kernels do not build here (no C++ compiler or ninja)")
    result, printed = quick_run(name)
    for header in CASES[name][1]:
        assert header in printed, f"{name}: {header!r} missing from\n{printed}"
    assert json.loads((quick_run.out_dir / f"{name}.json").read_text())["name"] == name
    assert result["name"] == name


@pytest.mark.process  # needs load's results
def test_run_all_renders(quick_run):
    from bench import run_all

    for name in ("roofline", "baselines", "load", "dtype"):  # the sections checked below
        quick_run(name)
    out_dir = quick_run.out_dir
    rc = run_all.main(["--render-only", "--quick", "--out", str(out_dir), "--results", str(out_dir / "RESULTS.md"),
                       "--png", str(out_dir / "throughput.png")])
    assert rc == 0
    text = (out_dir / "RESULTS.md").read_text()
    for header in ("## Goals", "## Machine", "### Heterogeneity tax", "### Baselines", "### Roofline", "### dtype"):
        assert header in text
