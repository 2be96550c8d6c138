"""`--compile`: the setting's meaning, and (slow: inductor compiles for minutes on a small CPU) the
packed-step tests rerun with every engine's forward compiled, float32, token for token as in eager."""

from __future__ import annotations

import pytest
import torch

from softserve.engine.compiled_forward import use_compile


def test_compile_setting(monkeypatch):
    import softserve.engine.compiled_forward as compiled_forward

    assert not use_compile("off", torch.bfloat16)
    assert use_compile("on", torch.float32) and use_compile("on", torch.bfloat16, "cuda")
    monkeypatch.setattr(compiled_forward, "has_cpp_compiler", lambda: True)
    assert use_compile("auto", torch.bfloat16) and use_compile("auto", torch.float16, "cpu")
    assert not use_compile("auto", torch.float32)  # float32 stays eager: token parity with PEFT's eager forward
    assert not use_compile("auto", torch.bfloat16, "cuda")  # never run on a GPU here: `on` only
    monkeypatch.setattr(compiled_forward, "has_cpp_compiler", lambda: False)
    assert not use_compile("auto", torch.bfloat16)  # inductor could not build its kernels
    assert use_compile("on", torch.bfloat16)  # `on` tries anyway, and fails loudly
    with pytest.raises(ValueError):
        use_compile("yes", torch.float32)


def test_the_server_compiles_by_default_and_direct_engine_users_do_not():
    from softserve.config import Settings
    from softserve.engine.config import EngineConfig

    assert Settings.model_fields["compile"].default == "auto"
    assert EngineConfig().compile == "off"


@pytest.mark.parametrize("setting", ["auto", "on"])
def test_a_failed_compile_serves_eager_under_auto_and_stops_the_start_under_on(setting, monkeypatch, tiny_model, tokenizer):
    """A broken toolchain or an op inductor cannot lower: auto logs and serves the eager modules (same
    tokens as an engine that never compiled); on raises, so a start that asked for the graph fails loudly."""
    import softserve.engine.engine as engine_module
    from softserve.engine.config import EngineConfig, SchedulerConfig
    from softserve.engine.model_runner import ModelRunner
    from tests.support.engine_utils import make_engine, make_request, run

    def broken(self, on, max_positions=None):
        if on:
            raise RuntimeError("InductorError: C++ compile error\n...")
        self.compiled_forward = None

    monkeypatch.setattr(ModelRunner, "use_compiled_forward", broken)
    monkeypatch.setattr(engine_module, "use_compile", lambda setting, dtype, device: setting != "off")
    config = EngineConfig(scheduler=SchedulerConfig(max_batch_size=2), model_id="test", compile=setting)
    if setting == "on":
        with pytest.raises(RuntimeError, match="C\\+\\+ compile error"):
            engine_module.LLMEngine(tiny_model, tokenizer, config)
        return
    engine = engine_module.LLMEngine(tiny_model, tokenizer, config)
    assert engine.runner.compiled_forward is None
    request, reference = (make_request([5, 6, 7], max_tokens=4, ignore_eos=True) for _ in range(2))
    assert run(engine, [request])[request.request_id] == run(make_engine(tiny_model, tokenizer), [reference])[reference.request_id]


@pytest.fixture
def compiled_engines(monkeypatch):
    """Every LLMEngine built in the test compiles its forward (and warms it up)."""
    import softserve.engine.engine as engine_module

    monkeypatch.setattr(engine_module, "use_compile", lambda *args: True)
    torch._dynamo.reset()  # graphs of other tests' models do not count toward the recompile limit


@pytest.mark.slow
@pytest.mark.process  # inductor runs the C++ compiler
def test_compiled_steps_equal_reference_solo_and_peft(compiled_engines, tiny_model, tokenizer, tmp_path):
    """Chunked prefill, 64 rows of 16 prompts, prefix-tuning rows: the same tokens as the eager reference,
    solo runs and PEFT (the tests of test_packed_steps.py, each engine compiled)."""
    from tests.engine import test_packed_steps as steps

    steps.test_chunked_prefill_of_a_long_prompt_equals_reference_and_solo(tiny_model, tokenizer)
    steps.test_64_concurrent_requests_16_prompts_equal_solo_and_reference(tiny_model, tokenizer)
    steps.test_prefix_tuning_rows_equal_peft_in_a_mixed_batch(tiny_model, tokenizer, tmp_path)


@pytest.mark.slow
@pytest.mark.process  # inductor runs the C++ compiler
def test_compiled_sliding_window_model_and_chunks_that_sample_nothing(compiled_engines, tokenizer):
    """Its first steps are chunks of one prompt that keep no logits: a compiled graph that keeps none
    dropped every layer and the KV writes with them (wrong tokens after the prefill), until the runner
    always kept one."""
    from tests.engine import test_packed_steps as steps

    steps.test_sliding_window_model_equals_its_own_full_recompute(tokenizer)


@pytest.mark.slow
@pytest.mark.process  # inductor runs the C++ compiler
def test_compiled_equals_eager_on_both_attention_paths(compiled_engines, tiny_model, tokenizer):
    from tests.engine import test_packed_attention as attention
    from tests.support.engine_utils import make_engine, make_prompt, make_request, run

    attention.test_engine_outputs_are_the_same_on_both_attention_paths(tiny_model, tokenizer)
    hidden = tiny_model.config.hidden_size
    prompts = [make_prompt(f"c{i}", k, hidden, seed=40 + i) for i, k in enumerate((4, 9))] + [None]
    inputs = [list(range(300 + 5 * i, 300 + 5 * i + n)) for i, n in enumerate((6, 25, 2, 14))]
    outputs = {}
    for compiled in (True, False):
        engine = make_engine(tiny_model, tokenizer, max_batch_size=3, max_prefill_tokens=12)
        assert (engine.runner.compiled_forward is not None) is True
        if not compiled:
            engine.runner.use_compiled_forward(False)
        requests = [make_request(ids, soft_prompt=prompts[i % 3], max_tokens=6, ignore_eos=True) for i, ids in enumerate(inputs)]
        done = run(engine, requests)
        outputs[compiled] = [done[r.request_id] for r in requests]
    assert outputs[True] == outputs[False]


@pytest.mark.slow
@pytest.mark.process  # inductor runs the C++ compiler
def test_one_graph_serves_every_step_shape(compiled_engines, tiny_model, tokenizer):
    """Start-up traces one graph, and no later step shape (one decode row, many rows, prefill chunks that
    keep one logit or none) traces another: a restart pays one trace, and serving never stalls on one."""
    from torch._dynamo.utils import counters

    from tests.support.engine_utils import make_engine, make_prompt, make_request, run

    before = counters["stats"]["unique_graphs"]
    engine = make_engine(tiny_model, tokenizer, max_batch_size=4, max_prefill_tokens=8)
    assert counters["stats"]["unique_graphs"] == before + 1  # warm_up: every WARM_UP_SHAPES size, one trace
    hidden = tiny_model.config.hidden_size
    solo = make_request(list(range(200, 205)), soft_prompt=make_prompt("s", 3, hidden, seed=7), max_tokens=4, ignore_eos=True)
    run(engine, [solo])  # one row: prefill, then one-token decode steps
    mixed = [make_request(list(range(300 + 7 * i, 300 + 7 * i + n)), soft_prompt=make_prompt(f"m{i}", 2 + i, hidden, seed=i),
                          max_tokens=5, ignore_eos=True) for i, n in enumerate((3, 19, 1, 11, 6))]
    run(engine, mixed)  # chunked prefill (keeps no logit), mixed steps, several decode rows
    assert counters["stats"]["unique_graphs"] == before + 1


@pytest.mark.slow
@pytest.mark.process  # inductor runs the C++ compiler
def test_the_engine_thread_runs_the_graph_traced_at_start_up(compiled_engines, tiny_model, tokenizer, monkeypatch):
    """The server builds the engine on its main thread (1 OpenMP thread) and steps it on the engine thread
    (the compute count). Dynamo guards a graph on torch.get_num_threads(): traced on the main thread, the
    first served step traced it again (~20 s for SmolLM2, inside run-batch's measured time)."""
    from torch._dynamo.utils import counters

    import softserve.engine.compute_threads as compute_threads
    from tests.support.engine_utils import make_engine, make_request, run

    monkeypatch.setattr(compute_threads, "_threads", 2)  # as `configure(2)` leaves it, without touching the process
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the main thread's count after `configure`
    try:
        engine = make_engine(tiny_model, tokenizer, max_batch_size=2)
        traced = counters["stats"]["unique_graphs"]
        requests = [make_request([9, 8, 7, 6], max_tokens=3, ignore_eos=True) for _ in range(2)]
        compute_threads.run_in_compute_thread(run, engine, requests)
        assert counters["stats"]["unique_graphs"] == traced
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_tables_give_the_modules_own_cos_and_sin(tiny_model, dtype):
    """The table is the rotary module's own output at every position, so indexing it == calling it, bit
    for bit; another dtype takes the module's own forward; installing twice changes nothing."""
    import copy

    from softserve.engine.compiled_forward import install_rotary_tables

    model = copy.deepcopy(tiny_model).to(dtype)
    rotary = model.model.rotary_emb
    x = torch.zeros(1, 5, 64, dtype=dtype)
    positions = torch.tensor([[0, 7, 1999, 3, 511]])
    with torch.no_grad():
        expected = rotary(x, positions)
        expected_half = rotary(x.half(), positions)
        assert install_rotary_tables(model, 2000) == 1 and install_rotary_tables(model, 2000) == 1
        assert rotary._softserve_rotary_table[0].shape == (2000, 16) and rotary._softserve_rotary_table[0].dtype == dtype
        got = rotary(x, positions)
        for g, e in zip(got, expected):
            assert g.shape == e.shape and g.dtype == e.dtype and torch.equal(g, e)
        got = rotary(x.half(), positions)
        assert all(torch.equal(g, e) and g.dtype == torch.float16 for g, e in zip(got, expected_half))


def test_rotary_tables_leave_dynamic_rope_and_gemma3_alone(tiny_model, tokenizer):
    import copy

    from softserve.engine.compiled_forward import install_rotary_tables
    from tests.engine.test_gemma3 import tiny_gemma3

    model = copy.deepcopy(tiny_model)
    model.model.rotary_emb.rope_type = "dynamic"  # cos/sin that depend on the sequence length: no table
    assert install_rotary_tables(model, 64) == 0
    assert getattr(model.model.rotary_emb, "_softserve_rotary_table", None) is None
    gemma = tiny_gemma3(len(tokenizer))  # forward(x, position_ids, layer_type): left as it is
    assert install_rotary_tables(gemma, 64) == 0


def _module_state(model) -> list:
    """What dynamo's dropped module guards would have checked: per module its type, training flag, hook
    dicts, plain attributes by value, objects by identity, and each parameter's and buffer's tensor
    properties; each fused group's fields by identity (its stash excepted: set and cleared per forward)."""
    def tensor(t):
        return None if t is None else (id(t), tuple(t.shape), t.stride(), t.dtype, t.device, t.requires_grad)

    state = []
    for name, module in model.named_modules():
        fields = {}
        for key, value in vars(module).items():
            if key in ("_parameters", "_buffers"):
                fields[key] = {k: tensor(v) for k, v in value.items()}
            elif key == "_modules":
                fields[key] = {k: id(v) for k, v in value.items()}
            elif isinstance(value, dict):
                fields[key] = (id(value), tuple(value))
            elif isinstance(value, (bool, int, float, str, type(None))):
                fields[key] = value
            elif isinstance(value, torch.Tensor):
                fields[key] = tensor(value)
            else:
                fields[key] = id(value)
        group = getattr(module, "_softserve_fused", None)
        if group is not None:
            fields["group"] = {k: id(v) for k, v in vars(group).items() if k != "stash"}
        state.append((name, type(module), fields))
    state.append(("config", model.config.to_dict()))
    return state


@pytest.mark.slow
@pytest.mark.process  # inductor runs the C++ compiler
def test_serving_and_tuning_leave_the_model_as_compiled(compiled_engines, tiny_model, tokenizer):
    """The compiled forward drops dynamo's guards on the model's modules (`frozen_model_guards`), which
    is sound only while nothing changes a module after the trace. Serving (soft prompts, a prefix-tuning
    row, chunked prefill, mixed steps) and a tuning job on the same model leave every module as it was,
    on the bf16 model with its packed and fused linears; and the check sees a change when there is one."""
    import copy

    from softserve.engine.packed_linear import set_packed
    from softserve.tuning.trainer import PromptTuner, TuningConfig
    from tests.support.engine_utils import make_engine, make_prompt, make_request, run
    from tests.support.tuning import toy_data

    model = copy.deepcopy(tiny_model).to(torch.bfloat16)
    engine = make_engine(model, tokenizer, max_batch_size=3, max_prefill_tokens=8)
    assert engine.runner.compiled_forward is not None
    compiled = _module_state(model)
    hidden = model.config.hidden_size

    def serve(seed: int) -> None:
        prompts = [make_prompt(f"f{seed}-{i}", 2 + i, hidden, seed=seed + i) for i in range(2)] + [None]
        requests = [make_request(list(range(100 + 9 * i, 100 + 9 * i + n)), soft_prompt=prompts[i % 3], max_tokens=4,
                                 ignore_eos=True) for i, n in enumerate((3, 13, 1, 6))]
        run(engine, requests)

    serve(1)
    PromptTuner(model, tokenizer, toy_data(tokenizer, 4), None,
                TuningConfig(num_virtual_tokens=2, init="vocab", steps=2, batch_size=4, micro_batch_size=2)).run()
    serve(2)
    assert _module_state(model) == compiled
    set_packed(model, False)  # what a dropped guard would have caught
    assert _module_state(model) != compiled
    set_packed(model, True)


@pytest.mark.slow
@pytest.mark.process  # inductor runs the C++ compiler
def test_a_changed_input_still_traces_a_new_graph(compiled_engines, tiny_model, tokenizer):
    """Only the module guards are dropped: the inputs' guards remain, so an input of another dtype traces
    a graph of its own instead of running the one traced for int64 positions."""
    from torch._dynamo.utils import counters

    from softserve.engine.packed_attention import AttentionPlan, PackedBatch, PackedRow, current_batch
    from tests.support.engine_utils import make_engine

    engine = make_engine(tiny_model, tokenizer, max_batch_size=2)
    runner = engine.runner
    traced = counters["stats"]["unique_graphs"]
    rows = (PackedRow(0, 4, 0, 4),)
    with torch.inference_mode():  # as the runner makes its inputs: another dispatch key set is another graph too
        slots = torch.arange(4)
        embeds = torch.randn(1, 4, tiny_model.config.hidden_size)
    batch = PackedBatch(pool=runner.pool, write_slots=slots, rows=rows, plan=AttentionPlan.build(rows, runner.device, runner.native_kernels))
    with torch.inference_mode(), current_batch(batch):
        expected = runner.compiled_forward(embeds, slots.unsqueeze(0), slots[3:])
        assert counters["stats"]["unique_graphs"] == traced
        got = runner.compiled_forward(embeds, slots.unsqueeze(0).to(torch.int32), slots[3:])
    assert counters["stats"]["unique_graphs"] == traced + 1
    torch.testing.assert_close(got, expected)


@pytest.mark.slow
@pytest.mark.process  # inductor runs the C++ compiler
def test_the_bf16_graph_calls_the_c_linear_op_where_the_kernel_runs(compiled_engines, tiny_model, tokenizer, monkeypatch):
    """On a CPU where the small-row kernel runs, the compiled graph's products are the C++ op (no Python
    custom op in between), with the tokens of the same graph through the Python op."""
    import copy

    from torch.profiler import profile

    from softserve.engine import native_kernels, packed_linear
    from tests.support.engine_utils import make_engine, make_request, run

    if not native_kernels.small_linear_available():
        pytest.skip("the small-row kernel is not built for this CPU (no AVX512-BF16, or AMX)")
    model = copy.deepcopy(tiny_model).to(torch.bfloat16)
    engine = make_engine(model, tokenizer, max_batch_size=3, max_prefill_tokens=8)
    inputs = [list(range(100 + 9 * i, 100 + 9 * i + n)) for i, n in enumerate((3, 13, 1))]

    def tokens() -> list[list[int]]:
        requests = [make_request(ids, max_tokens=4, ignore_eos=True) for ids in inputs]
        done = run(engine, requests)
        return [done[r.request_id] for r in requests]

    with profile() as prof:
        through_c = tokens()
    names = {event.key for event in prof.key_averages()}
    assert "softserve_native::small_or_packed_linear" in names and "softserve::packed_linear" not in names
    # A row limit for the plain weight that no step reaches: the same kernels, through the Python op
    monkeypatch.setattr(packed_linear, "MAX_PACKED_ROWS", 1 << 40)
    torch._dynamo.reset()
    engine.runner.use_compiled_forward(True)
    with profile() as prof:
        through_python = tokens()
    names = {event.key for event in prof.key_averages()}
    assert "softserve::packed_linear" in names and "softserve_native::small_or_packed_linear" not in names
    assert through_c == through_python


@pytest.mark.slow
@pytest.mark.process  # inductor runs the C++ compiler
def test_the_graph_runs_native_steps_attention_in_c_and_hands_others_to_python(compiled_engines, tiny_model, tokenizer,
                                                                               monkeypatch):
    """With our kernels the graph's attention is their C++ op: a step they run whole never enters the Python op;
    a step with a long prefill row (SDPA) goes through it. Tokens: those of the graph that calls the Python op."""
    import copy

    from torch.profiler import profile

    from softserve.engine import native_kernels, packed_attention
    from softserve.engine.compiled_forward import compile_forward
    from tests.support.engine_utils import make_engine, make_request, run

    if not native_kernels.can_build():
        pytest.skip("no C++ compiler or ninja: no native kernels")
    model = copy.deepcopy(tiny_model).to(torch.bfloat16)
    engine = make_engine(model, tokenizer, max_batch_size=3, max_prefill_tokens=64)
    assert engine.runner.native_kernels
    inputs = [list(range(100 + 9 * i, 100 + 9 * i + n)) for i, n in enumerate((3, 13, 1))]

    def tokens() -> tuple[list[list[int]], set[str]]:
        requests = [make_request(ids, max_tokens=4, ignore_eos=True) for ids in inputs]
        with profile() as prof:
            done = run(engine, requests)
        return [done[r.request_id] for r in requests], {event.key for event in prof.key_averages()}

    native, names = tokens()
    assert "softserve_native::step_attention" in names and "softserve::packed_attention" not in names
    with monkeypatch.context() as patch:
        patch.setattr(packed_attention, "NATIVE_PREFILL_MAX_KV", 4)  # the 13-token prompt's prefill: SDPA
        mixed, names = tokens()
    assert "softserve_native::step_attention" in names and "softserve::packed_attention" in names
    torch._dynamo.reset()
    engine.runner.compiled_forward = compile_forward(model, native_attention=False)  # the Python op for every step
    python, names = tokens()
    assert "softserve_native::step_attention" not in names and "softserve::packed_attention" in names
    assert native == mixed == python
