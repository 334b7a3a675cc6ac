"""A fixed-shape decode step (what a CUDA graph replays) computes what the engine's dynamic step
computes, and drawing tokens on the device draws what the host draws. On the CPU the step runs
eagerly; the tests that capture graphs need CUDA and are skipped without it."""

import copy

import pytest
import torch

from qwen2.config import Qwen2Config
from qwen2.engine.cuda_graphs import StaticDecode, bucket, unsupported
from qwen2.engine.engine import Engine
from qwen2.engine.sampling import SamplingParams, sample, sample_rows, samples_on_device
from qwen2.model import PagedKVCache, Transformer
from qwen2.quant.int_linear import quantize_model

SMALL = dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, rope_theta=10000.0, tie_word_embeddings=False)
MOE = dict(model_type="qwen2_moe", num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
           shared_expert_intermediate_size=32)
NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs are captured on CUDA only")


def small_model(**overrides) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(Qwen2Config(**(SMALL | overrides))).eval()
    with torch.no_grad():  # sharper logits than the default init, so greedy choices are clear-cut
        model.model.embed_tokens.weight.normal_(0, 1.0)
    return model


def filled_caches(model: Transformer, lengths: list[int]) -> tuple[PagedKVCache, PagedKVCache, list[list[int]]]:
    """Two identical paged caches (on the model's device) holding one prompt per slot, in scattered blocks."""
    device = model.lm_head.weight.device
    cache = PagedKVCache(model.config, blocks=40, block_size=16, slots=len(lengths), max_len=256, device=device)
    cache.k.zero_(), cache.v.zero_()
    free = list(range(39, 0, -1))
    prompts = []
    for slot, n in enumerate(lengths):
        blocks = [free.pop() for _ in range(-(-(n + 8) // 16))]  # room for a few decode steps
        cache.tables[slot, :len(blocks)] = torch.tensor(blocks)
        prompt = torch.randint(0, model.config.vocab_size, (n,)).tolist()
        model(torch.tensor([prompt], device=device), torch.arange(n, device=device)[None], cache=cache,
              slots=torch.tensor([slot], device=device))
        prompts.append(prompt)
    twin = PagedKVCache(model.config, blocks=40, block_size=16, slots=len(lengths), max_len=256, device=device)
    twin.k.copy_(cache.k), twin.v.copy_(cache.v), twin.tables.copy_(cache.tables)
    return cache, twin, prompts


def test_buckets_are_powers_of_two_of_rows_and_of_blocks_of_keys():
    assert [bucket(n, 1) for n in (1, 2, 3, 5, 32, 33)] == [1, 2, 4, 8, 32, 64]
    assert [bucket(n, 16) for n in (1, 16, 17, 100)] == [16, 16, 32, 128]


@pytest.mark.parametrize("overrides", [{}, dict(use_sliding_window=True, sliding_window=5, max_window_layers=1)],
                         ids=["full-attention", "sliding-window"])
@torch.inference_mode()
def test_static_step_equals_the_dynamic_step_over_several_steps(overrides):
    model = small_model(**overrides)
    lengths = [3, 15, 30]  # 3 rows pad to a batch of 4; the keys grow from 32 to 64 on the way
    dynamic, static_cache, prompts = filled_caches(model, lengths)
    static = StaticDecode(model, static_cache, capture=False)
    slots, positions = [0, 1, 2], list(lengths)
    tokens = [p[-1] for p in prompts]
    for _ in range(6):
        expected = model(torch.tensor(tokens)[:, None], torch.tensor(positions)[:, None], cache=dynamic,
                         slots=torch.tensor(slots), logits_index=torch.zeros(3, dtype=torch.long))
        got = static(tokens, positions, slots)
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        tokens = got.argmax(-1).tolist()
        assert tokens == expected.argmax(-1).tolist()
        positions = [p + 1 for p in positions]
    assert set(static.logits) == {4}  # one batch bucket, fixed buffers


@pytest.mark.slow  # torch.compile on the CPU: ~18 s, past the default suite's budget
@torch.inference_mode()
def test_a_compiled_static_step_computes_what_the_eager_one_does():
    model = small_model()
    eager_cache, compiled_cache, prompts = filled_caches(model, [3, 15, 30])
    eager = StaticDecode(model, eager_cache, capture=False)
    compiled = StaticDecode(model, compiled_cache, capture=False, compile=True)
    tokens, positions, slots = [p[-1] for p in prompts], [3, 15, 30], [0, 1, 2]
    for _ in range(2):
        expected = eager(tokens, positions, slots).clone()
        torch.testing.assert_close(compiled(tokens, positions, slots), expected, atol=1e-5, rtol=1e-5)
        tokens, positions = expected.argmax(-1).tolist(), [p + 1 for p in positions]


@torch.inference_mode()
def test_rows_padding_a_batch_write_only_the_padding_block():
    model = small_model()
    _, cache, prompts = filled_caches(model, [20, 7, 33])
    before = cache.k.clone(), cache.v.clone()
    rows = [(0, 20), (2, 33), (1, 7)]  # 3 rows: padded to a batch of 4
    StaticDecode(model, cache, capture=False)([prompts[s][-1] for s, _ in rows], [p for _, p in rows],
                                              [s for s, _ in rows])
    written = torch.zeros(cache.blocks, cache.block_size, dtype=torch.bool)
    for slot, position in rows:
        written[int(cache.tables[slot, position // 16]), position % 16] = True
    for pool, old in zip((cache.k, cache.v), before):
        assert torch.equal(pool[:, 1:][:, ~written[1:]], old[:, 1:][:, ~written[1:]])  # nothing else moved
        assert (pool[:, written] != old[:, written]).any(-1).any(-1).all()  # each real row wrote its entry
        assert not torch.equal(pool[:, 0, 0], old[:, 0, 0])  # the padding row wrote block 0 (it was zeros)


def test_unsupported_models_are_named_and_refused():
    assert unsupported(small_model()) is None
    dca = small_model(dual_chunk_attention_config={"chunk_size": 64, "local_size": 16})
    assert "dual chunk" in unsupported(dca)
    assert "plain Transformer" in unsupported(torch.nn.Sequential(small_model()))
    cache = PagedKVCache(dca.config, blocks=4, block_size=16, slots=1, max_len=32)
    with pytest.raises(ValueError, match="dual chunk"):
        StaticDecode(dca, cache, capture=False)


def test_moe_layers_are_captured_only_grouped_in_bfloat16():
    moe = small_model(**MOE)
    assert "ungrouped" in unsupported(moe)
    assert unsupported(moe, capture=False) is None  # the CPU's eager fixed-shape step runs any MoE
    assert moe.fuse_weights() == []
    assert "bfloat16" in unsupported(moe)
    moe.to(torch.bfloat16)  # new storage for every parameter: the stacks no longer hold the experts
    assert "ungrouped" in unsupported(moe)
    assert moe.fuse_weights() == [] and unsupported(moe) is None
    quantize_model(moe, "int8", 32)
    assert moe.fuse_weights() == [0, 1] and "quantized" in unsupported(moe)


@torch.inference_mode()
def test_static_step_of_grouped_moe_equals_the_per_expert_dynamic_step():
    looped = small_model(**MOE)
    model = copy.deepcopy(looped)
    dynamic, static_cache, prompts = filled_caches(looped, [3, 15, 30])
    static = StaticDecode(model, static_cache, capture=False)  # groups the experts
    assert all(block.mlp.grouped for block in model.model.layers) and not looped.model.layers[0].mlp.grouped
    slots, positions, tokens = [0, 1, 2], [3, 15, 30], [p[-1] for p in prompts]
    for _ in range(6):
        expected = looped(torch.tensor(tokens)[:, None], torch.tensor(positions)[:, None], cache=dynamic,
                          slots=torch.tensor(slots), logits_index=torch.zeros(3, dtype=torch.long))
        got = static(tokens, positions, slots)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        tokens, positions = expected.argmax(-1).tolist(), [p + 1 for p in positions]


def test_device_sampling_draws_what_the_host_draws():
    """Bias and penalties included: the batched draw applies them as the host's one-row draw does."""
    torch.manual_seed(1)
    logits = torch.randn(9, 300) * 3
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0.8, seed=1),
              SamplingParams(temperature=1.2, top_k=20, seed=2), SamplingParams(top_p=0.7, seed=3),
              SamplingParams(min_p=0.1, temperature=0.5, seed=4),
              SamplingParams(temperature=0, logit_bias={17: -100, 7: 100}),
              SamplingParams(temperature=0.9, seed=5, logit_bias={3: 5.0, 11: -2.5}),
              SamplingParams(temperature=0, repetition_penalty=1.3, logit_bias={4: 1.5}),
              SamplingParams(temperature=0.7, seed=6, presence_penalty=0.8, frequency_penalty=0.4)]
    histories = [([1, 2, 3], []), ([5], [6, 6]), ([], []), ([9], [10]), ([], [1]), ([4], [7]),
                 ([3, 11], []), ([4, 8, 8], [12, 4]), ([2], [13, 13, 14])]
    for step in range(20):
        host_gens = [None if p.seed is None else torch.Generator().manual_seed(p.seed + step) for p in params]
        row_gens = [None if p.seed is None else torch.Generator().manual_seed(p.seed + step) for p in params]
        rows = logits.roll(step, dims=1)
        host = [sample(row, p, prompt, output, g)
                for row, p, (prompt, output), g in zip(rows, params, histories, host_gens)]
        before = rows.clone()
        assert sample_rows(rows, params, row_gens, histories).tolist() == host
        assert torch.equal(rows, before)  # what the bias and penalties changed was put back
    assert host[5] == 7


def test_a_failed_device_draw_leaves_the_logits_as_they_were():
    logits = torch.randn(2, 50)
    before = logits.clone()
    params = [SamplingParams(temperature=0, logit_bias={4: 9.0}, repetition_penalty=2.0),
              SamplingParams(temperature=0.5, seed=1)]
    with pytest.raises(TypeError):
        sample_rows(logits, params, [None, "not a generator"], [([1, 2], [3]), ([], [])])
    assert torch.equal(logits, before)


def test_only_requests_without_processors_or_logprobs_sample_on_the_device():
    assert samples_on_device(SamplingParams(temperature=0.7, top_p=0.9, top_k=5, min_p=0.05, seed=3))
    assert samples_on_device(SamplingParams(temperature=0, logit_bias={3: -100}, repetition_penalty=1.1,
                                            presence_penalty=0.5, frequency_penalty=0.5))
    for needs_host in [dict(logprobs=2), dict(logits_processors=[lambda ids, x: x])]:
        assert not samples_on_device(SamplingParams(**needs_host)), needs_host


def run_engine(model, tokenizer, static_decode, requests):
    engine = Engine(model, tokenizer, max_concurrency=4, max_seq_len=256, prefill_chunk=16,
                    static_decode=static_decode)
    submitted = [engine.submit(prompt, SamplingParams(max_tokens=12, ignore_eos=True, **params))
                 for prompt, params in requests]
    outputs = {r.id: [] for r in submitted}
    while engine.has_work:
        for out in engine.step():
            outputs[out.request_id].append(out)
    return engine, submitted, outputs


ENGINE_REQUESTS = [
    ("def quicksort(arr):", dict(temperature=0)),
    ("The capital of France is", dict(temperature=0.9, top_p=0.9, seed=7)),
    ("x", dict(temperature=1.0, top_k=50, seed=11)),
    ("一二三四五六七八九十 and then some more words here", dict(temperature=0.7, repetition_penalty=1.3, seed=5)),
    ("import numpy as np", dict(temperature=0, logprobs=3)),
    ("hello", dict(temperature=0.8, min_p=0.05, seed=2)),
]


def test_engine_with_static_decode_gives_the_same_outputs(tiny_model, default_tokenizer):
    default, plain, plain_out = run_engine(tiny_model, default_tokenizer, None, ENGINE_REQUESTS)
    assert default.static_decode is None  # the CPU keeps its dynamic decode unless asked
    static, fixed, fixed_out = run_engine(tiny_model, default_tokenizer, True, ENGINE_REQUESTS)
    assert isinstance(static.static_decode, StaticDecode) and not static.static_decode.capture
    for a, b in zip(plain, fixed):
        assert a.output == b.output and len(a.output) == 12 and a.finish_reason == b.finish_reason == "length"
    for id_ in plain_out:
        for x, y in zip(plain_out[id_], fixed_out[id_]):
            assert (x.token, x.text, x.top_logprobs is None) == (y.token, y.text, y.top_logprobs is None)
            if x.logprob is not None:
                assert y.logprob == pytest.approx(x.logprob, abs=1e-4)
    assert not static.static_decode.graphs  # eager on the CPU: nothing captured
    assert set(static.static_decode.logits) <= {1, 2, 4}  # at most 4 requests decode at once


@NEEDS_CUDA
@pytest.mark.parametrize("moe", [False, True], ids=["dense-float32", "grouped-moe-bf16"])
@torch.inference_mode()
def test_a_captured_graph_replays_what_the_eager_step_computes(moe):
    model = small_model(**MOE).cuda().to(torch.bfloat16) if moe else small_model().cuda()
    tolerance = 2e-2 if moe else 1e-4
    eager_cache, graph_cache, prompts = filled_caches(model, [3, 15, 30])
    eager = StaticDecode(model, eager_cache, capture=False)
    graphed = StaticDecode(model, graph_cache, capture=True)
    tokens, positions, slots = [p[-1] for p in prompts], [3, 15, 30], [0, 1, 2]
    for _ in range(6):
        expected, got = eager(tokens, positions, slots).clone(), graphed(tokens, positions, slots)
        torch.testing.assert_close(got, expected, atol=tolerance, rtol=tolerance)
        tokens, positions = expected.argmax(-1).tolist(), [p + 1 for p in positions]
    assert graphed.capture and set(graphed.graphs) == {(4, 32), (4, 64)}  # captured, not fallen back to eager
    torch.testing.assert_close(graph_cache.k[:, 1:], eager_cache.k[:, 1:], atol=tolerance, rtol=tolerance)


@NEEDS_CUDA
def test_the_cuda_engine_decodes_the_cpu_greedy_tokens_through_graphs(tiny_model, default_tokenizer):
    greedy = [(prompt, dict(temperature=0)) for prompt, _ in ENGINE_REQUESTS]
    _, on_cpu, _ = run_engine(tiny_model, default_tokenizer, None, greedy)
    engine, on_cuda, _ = run_engine(copy.deepcopy(tiny_model).cuda(), default_tokenizer, None, greedy)
    assert engine.static_decode is not None and engine.static_decode.capture and engine.static_decode.graphs
    assert [r.output for r in on_cuda] == [r.output for r in on_cpu]


def test_a_failed_static_forward_ends_its_requests_and_the_engine_goes_on(tiny_model, default_tokenizer):
    engine = Engine(tiny_model, default_tokenizer, max_concurrency=2, max_seq_len=128, static_decode=True)
    request = engine.submit("def quicksort(arr):", SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    working, engine.static_decode = engine.static_decode, lambda *args: 1 / 0
    outputs = []
    while engine.has_work:
        outputs += engine.step()
    assert request.finish_reason == "error" and "forward" in outputs[-1].error and len(request.output) == 1
    engine.static_decode = working
    again = engine.submit("def quicksort(arr):", SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    while engine.has_work:
        engine.step()
    assert again.finish_reason == "length" and again.output[0] == request.output[0]


def test_when_device_sampling_fails_the_host_samples_instead(tiny_model, default_tokenizer, monkeypatch, caplog):
    requests = ENGINE_REQUESTS[:3]
    _, expected, _ = run_engine(tiny_model, default_tokenizer, None, requests)

    def broken(*args):
        raise RuntimeError("no device sampling today")

    monkeypatch.setattr("qwen2.engine.engine.sample_rows", broken)
    _, got, _ = run_engine(tiny_model, default_tokenizer, True, requests)
    assert [r.output for r in got] == [r.output for r in expected]
    assert "sampling on the host" in caplog.text
