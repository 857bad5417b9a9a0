"""The static-cache decoder (the GPU path) computes what `transformers` computes, and
speculative decoding over it emits exactly its own plain greedy tokens.

On CPU its steps run eagerly over the static cache, so CI checks the cache, the positions
and the masks; on CUDA the same tests run the captured graphs (the GPU script runs them).
The decoder keeps a float32 residual stream: verifying k+1 positions and decoding them one by
one differ by ~1e-7 in the logits, far below these models' top-2 logit margins (>1e-3).
"""
from __future__ import annotations

import gc
from dataclasses import replace

import pytest
import torch

from specdec import Engine, SamplingParams
from specdec.kernels import gpu_kernels
from specdec.backends.compact_decoder import CompactDecoder
from specdec.backends.graph_decoder import GraphDecoder, graph_decoder_for
from specdec.backends.step_graphs import GRAPH_MAX_TOKENS
from specdec.backends.hf import HFCausalLM
import tiny
from test_compact_decoder import worst_gap_through_rewinds
from exactness import PROMPTS

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.float32 if DEVICE == "cuda" else torch.float64


def _decoder(model, capacity: int = 256) -> tuple[CompactDecoder, GraphDecoder]:
    """The reference is the compact decoder on its growing cache (itself checked against
    transformers in test_compact_decoder.py: some transformers releases fail a cropped
    sliding-window cache on CUDA)."""
    model = model.to(DEVICE)
    eos, vocab = set(), model.config.vocab_size
    return (CompactDecoder(model, "reference", DTYPE, eos, vocab),
            GraphDecoder(model, "static", DTYPE, eos, vocab, capacity))


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_logits_match_the_compact_decoder_through_steps_and_rewinds(family):
    model = tiny.llama(0, dtype=DTYPE) if family == "llama" else tiny.gemma3(0, dtype=DTYPE)
    reference, decoder = _decoder(model)
    ids = torch.randint(3, tiny.VOCAB, (70,), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    worst = worst_gap_through_rewinds(reference, decoder, ids, step=5, keep=2)  # Gemma's window (8) crossed often
    assert worst < 1e-4, worst  # its residual stream is float32 whatever the weights' dtype


@pytest.mark.parametrize("k", [1, 3, 8, None])
@pytest.mark.parametrize("drafter", ["ngram", "self", "random"])
def test_speculative_output_equals_plain_output_of_the_same_path(drafter, k):
    _, target = _decoder(tiny.llama(0, dtype=DTYPE))
    drafts = {"self": target, "random": _decoder(tiny.llama(1, dtype=DTYPE))[1]}
    engine = Engine(target, drafter="ngram") if drafter == "ngram" else \
        Engine(target, drafter="model", draft_model=drafts[drafter])
    for prompt in PROMPTS:
        plain = engine.generate(prompt, max_new_tokens=40, num_draft_tokens=0).token_ids
        spec = engine.generate(prompt, max_new_tokens=40, num_draft_tokens=k)
        assert spec.token_ids == plain, prompt
        if drafter == "self" and k is not None:  # the same weights: speculation really ran, all accepted
            assert spec.stats.acceptance_rate == 1.0 and spec.stats.target_forward_passes < 40


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_chained_plain_decoding_emits_step_by_step_greedy_tokens_and_rewinds_what_ran_ahead(family):
    """Plain greedy decoding on this path runs a step ahead of the host (GreedyChain): the
    tokens must be those of the compact decoder's one-at-a-time plain decoding, whether the
    sequence ends by its budget or by an EOS with a step already launched after it."""
    model = tiny.llama(0, dtype=DTYPE) if family == "llama" else tiny.gemma3(0, dtype=DTYPE)
    reference, decoder = _decoder(model)
    for prompt in PROMPTS:
        expected = Engine(reference).generate(prompt, max_new_tokens=24, num_draft_tokens=0).token_ids
        generation = Engine(decoder).start(prompt, SamplingParams(max_new_tokens=24, num_draft_tokens=0))
        generation.step()
        assert generation._chain is not None  # the chained path runs, not the verify path
        assert generation.run().token_ids == expected, prompt
        assert decoder.cache_length(generation.cache) == generation.length - 1  # all but the last token
    eos = expected[5]
    reference.eos_token_ids = decoder.eos_token_ids = frozenset({eos})
    stopped = Engine(reference).generate(PROMPTS[-1], max_new_tokens=24, num_draft_tokens=0)
    generation = Engine(decoder).start(PROMPTS[-1], SamplingParams(max_new_tokens=24, num_draft_tokens=0))
    assert generation.run().token_ids == stopped.token_ids and stopped.token_ids[-1] == eos
    assert len(stopped.token_ids) < 24 and generation.output().finish_reason == "stop"
    assert decoder.cache_length(generation.cache) == generation.length - 1  # the step after the EOS is gone


def test_a_chained_generation_that_joins_a_batch_and_leaves_it_keeps_its_own_tokens():
    """Alone, a plain greedy request runs chained (its cache a step ahead); in a batch it is
    drafted and verified with the others, so it must first fall back to the loop's invariant."""
    from specdec.batching import BatchStepper

    reference, decoder = _decoder(tiny.llama(0, dtype=DTYPE))
    expected = Engine(reference).generate(PROMPTS[0], max_new_tokens=20, num_draft_tokens=0).token_ids
    other_expected = Engine(reference).generate(PROMPTS[1], max_new_tokens=6, num_draft_tokens=0).token_ids
    engine = Engine(decoder, drafter="ngram")
    chained = engine.start(PROMPTS[0], SamplingParams(max_new_tokens=20, num_draft_tokens=0))
    other = engine.start(PROMPTS[1], SamplingParams(max_new_tokens=6))
    stepper = BatchStepper(decoder)
    for _ in range(3):
        stepper.step([chained])
    assert chained._chain is not None
    while not other.finished:
        assert not any(isinstance(r, BaseException) for r in stepper.step([g for g in (chained, other)
                                                                               if not g.finished]))
    while not chained.finished:
        stepper.step([chained])
    assert chained.output().token_ids == expected and other.output().token_ids == other_expected


def test_chained_decoding_is_only_for_plain_greedy_requests():
    _, decoder = _decoder(tiny.llama(0, dtype=DTYPE))
    engine = Engine(decoder, drafter="ngram")
    assert engine.start(PROMPTS[0], SamplingParams(max_new_tokens=4, num_draft_tokens=0))._chained
    assert not engine.start(PROMPTS[0], SamplingParams(max_new_tokens=4))._chained  # drafting
    assert not engine.start(PROMPTS[0], SamplingParams(max_new_tokens=4, num_draft_tokens=0,
                                                       temperature=0.7))._chained  # sampling
    sampled = engine.generate(PROMPTS[0], max_new_tokens=6, num_draft_tokens=0, temperature=0.7, seed=3)
    assert len(sampled.token_ids) == 6


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_a_batch_on_static_caches_gives_each_sequence_its_own_outputs(family):
    from specdec.batching import BatchStepper

    # float64 on every device: a packed pass and a graph replay use different matmul shapes,
    # and float32 CUDA kernels then differ enough to flip near-ties of these random models.
    dtype = torch.float64
    model = (tiny.llama(0, dtype=dtype) if family == "llama" else tiny.gemma3(0, dtype=dtype)).to(DEVICE)
    eos, vocab = set(), model.config.vocab_size
    target = GraphDecoder(model, "static", dtype, eos, vocab, 256)
    draft = GraphDecoder(tiny.llama(0, dtype=dtype).to(DEVICE), "draft", dtype, eos, vocab, 256)
    engine = Engine(target, drafter="model", draft_model=draft) if family == "llama" else Engine(target, drafter="ngram")
    params = [SamplingParams(max_new_tokens=30, num_draft_tokens=k) for k in (None, 2, 4, None, 1, 3)]
    alone = [engine.start(p, q).run().token_ids for p, q in zip(PROMPTS, params)]
    generations = [engine.start(p, q) for p, q in zip(PROMPTS, params)]
    stepper = BatchStepper(target)
    while not all(g.finished for g in generations):
        running = [g for g in generations if not g.finished]
        assert not any(isinstance(r, BaseException) for r in stepper.step(running))
    assert [g.output().token_ids for g in generations] == alone


def test_constrained_outputs_on_the_graph_path_equal_constrained_plain_alone_and_in_a_batch():
    # Structured outputs (grammar.py) over static caches: masks on the device's logits, forced
    # tokens drafted, refused drafts cut; greedy output is the same path's constrained plain one.
    from specdec.batching import BatchStepper

    dtype = torch.float64  # as the batch test above: a packed pass and a replay must not flip near-ties
    eos, tokenizer = {2}, tiny.tokenizer()
    target = GraphDecoder(tiny.llama(0, dtype=dtype).to(DEVICE), "static", dtype, eos, tiny.VOCAB, 256)
    draft = GraphDecoder(tiny.llama(1, dtype=dtype).to(DEVICE), "draft", dtype, eos, tiny.VOCAB, 256)
    schema = {"type": "object", "additionalProperties": False, "required": ["name", "n"],
              "properties": {"name": {"type": "string", "maxLength": 6}, "n": {"type": "integer", "maximum": 99,
                                                                            "minimum": 0}}}
    formats = [{"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
               {"type": "regex", "regex": "(fox|dog) [0-9]{2,3}"}, None]
    for engine in (Engine(target, tokenizer, "ngram"), Engine(target, tokenizer, "model", draft)):
        params = [SamplingParams(max_new_tokens=40, num_draft_tokens=k, response_format=f)
                  for k, f in zip((None, 3, 2, 4, None, 1), formats * 2)]
        plain = [engine.start(p, replace(q, num_draft_tokens=0)).run() for p, q in zip(PROMPTS, params)]
        assert [engine.start(p, q).run().token_ids for p, q in zip(PROMPTS, params)] == [o.token_ids for o in plain]
        assert all(o.finish_reason == "stop" for o, q in zip(plain, params) if q.response_format)
        generations = [engine.start(p, q) for p, q in zip(PROMPTS, params)]
        stepper = BatchStepper(target)
        while not all(g.finished for g in generations):
            running = [g for g in generations if not g.finished]
            assert not any(isinstance(r, BaseException) for r in stepper.step(running))
        assert [g.output().token_ids for g in generations] == [o.token_ids for o in plain]


@pytest.mark.skipif(not gpu_kernels.available(), reason="needs Triton")
def test_fused_kernels_give_the_logits_of_the_compact_decoder_through_steps_and_rewinds():
    model = tiny.llama(0, dtype=torch.float32).to(DEVICE)
    reference = CompactDecoder(model, "reference", torch.float32, set(), tiny.VOCAB)
    fused = GraphDecoder(model, "fused", torch.float32, set(), tiny.VOCAB, 256, kernels=True)
    assert fused.kernels
    ids = torch.randint(3, tiny.VOCAB, (40,), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    assert worst_gap_through_rewinds(reference, fused, ids, step=5, keep=2) < 1e-4


@pytest.mark.skipif(not gpu_kernels.available(), reason="needs Triton")
def test_speculative_output_over_the_fused_kernels_equals_their_plain_output():
    fused = GraphDecoder(tiny.llama(0, dtype=torch.float32).to(DEVICE), "fused", torch.float32, set(), tiny.VOCAB,
                         256, kernels=True)
    # A prompt each (Triton's interpreter on CPU takes ~5 s a generation; CUDA runs it in ms)
    for engine, prompt in zip((Engine(fused, drafter="ngram"), Engine(fused, drafter="model", draft_model=fused)),
                              PROMPTS[:2]):
        plain = engine.generate(prompt, max_new_tokens=16, num_draft_tokens=0).token_ids
        assert engine.generate(prompt, max_new_tokens=16, num_draft_tokens=3).token_ids == plain, prompt


def test_fused_kernels_refuse_layers_they_do_not_fuse():
    with pytest.raises(ValueError, match="do not apply"):
        GraphDecoder(tiny.gemma3(0, dtype=torch.float32), "g", torch.float32, set(), tiny.VOCAB, 64, kernels=True)
    with pytest.raises(ValueError, match="do not apply"):  # float64: outside the kernels' dtypes
        GraphDecoder(tiny.llama(0), "l", torch.float64, set(), tiny.VOCAB, 64, kernels=True)
    assert not GraphDecoder(tiny.llama(0), "l", torch.float64, set(), tiny.VOCAB, 64).kernels


@pytest.mark.skipif(not gpu_kernels.available(), reason="needs Triton")
def test_the_fused_kernels_are_chosen_on_cuda_unless_turned_off(monkeypatch):
    model = tiny.llama(0, dtype=torch.float32).to(DEVICE)
    assert GraphDecoder(model, "auto", torch.float32, set(), tiny.VOCAB, 64).kernels == (DEVICE == "cuda")
    monkeypatch.setenv("SPECDEC_GPU_KERNELS", "0")
    assert not GraphDecoder(model, "off", torch.float32, set(), tiny.VOCAB, 64).kernels


def test_a_finished_sequence_hands_its_cache_slot_to_the_next():
    _, decoder = _decoder(tiny.llama(0, dtype=DTYPE))
    first = decoder.new_cache()
    slot = first.slot
    decoder.release(first)
    decoder.release(first)  # twice is harmless
    assert first.slot is None
    second = decoder.new_cache()
    assert second.slot is slot  # its buffers (and graphs) are reused, not rebuilt
    del second
    gc.collect()  # no finaliser hands a slot back behind the stepping thread's back
    assert decoder.new_cache().slot is not slot


def test_steps_past_the_capacity_are_refused_with_a_clear_error():
    _, decoder = _decoder(tiny.llama(0, dtype=DTYPE), capacity=32)
    assert decoder.max_context == 32  # the engine checks requests against this
    cache = decoder.new_cache()
    decoder.prefill(torch.arange(3, 33, device=DEVICE), cache)
    with pytest.raises(ValueError, match="32 positions"):
        decoder.forward(torch.tensor([5, 6, 7], device=DEVICE), cache, 3)
    engine = Engine(decoder, drafter="ngram")
    with pytest.raises(Exception, match="32"):
        engine.generate(list(range(3, 30)), max_new_tokens=10)


def test_prompts_longer_than_a_graph_step_run_eagerly_on_the_same_cache():
    reference, decoder = _decoder(tiny.llama(0, dtype=DTYPE))
    ids = torch.randint(3, tiny.VOCAB, (GRAPH_MAX_TOKENS + 9,), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    a = reference.forward(ids, reference.new_cache(), 2)
    b = decoder.forward(ids, decoder.new_cache(), 2)
    assert torch.allclose(a, b, atol=1e-4)


def test_graph_path_is_chosen_only_where_it_applies():
    cpu_model = tiny.wrap(tiny.llama(0, dtype=torch.float32))
    assert graph_decoder_for(cpu_model) is cpu_model  # CPU keeps its own fast path
    if DEVICE == "cuda":
        assert isinstance(graph_decoder_for(HFCausalLM(tiny.llama(0, dtype=torch.float32).cuda(), "t")), GraphDecoder)


def _fused_pair(capacity: int = 128, sequences: int = 3) -> tuple[GraphDecoder, GraphDecoder]:
    """The same model twice over the fused kernels: one steps sequences alone, one batches them
    through its pool."""
    model = tiny.llama(0, dtype=torch.float32).to(DEVICE)
    alone = GraphDecoder(model, "alone", torch.float32, set(), tiny.VOCAB, capacity, kernels=True)
    batched = GraphDecoder(model, "batched", torch.float32, set(), tiny.VOCAB, capacity, kernels=True)
    batched.reserve_sequences(sequences)
    return alone, batched


@pytest.mark.skipif(not gpu_kernels.available(), reason="needs Triton")
def test_a_pooled_batch_with_ragged_feeds_and_rewinds_gives_each_sequence_its_own_logits():
    alone, batched = _fused_pair()
    ids = torch.randint(3, tiny.VOCAB, (3, 40), generator=torch.Generator().manual_seed(4)).to(DEVICE)
    prompts = (5, 17, 9)  # different lengths: each sequence its own positions
    mine, theirs = [alone.new_cache() for _ in prompts], [batched.new_cache() for _ in prompts]
    assert all(c.slot.index is not None for c in theirs)
    for i, n in enumerate(prompts):
        alone.prefill(ids[i, :n], mine[i])
        batched.prefill(ids[i, :n], theirs[i])
    # ragged feeds (3 sequences pad to a batch of 4: the spare slot), then rewinds of each
    for feeds, keep in (((1, 4, 2), (1, 2, 0)), ((3, 1, 5), (3, 0, 5)), ((2, 2, 1), (1, 2, 1))):
        at = [c.length for c in mine]
        expected = [alone.forward(ids[i, a : a + n], c, n) for i, (a, n, c) in enumerate(zip(at, feeds, mine))]
        got = batched.forward_batch([ids[i, a : a + n] for i, (a, n) in enumerate(zip(at, feeds))], theirs, list(feeds))
        for e, g in zip(expected, got):
            assert g.shape == e.shape and float((e - g).abs().max()) < 1e-4
        for model, caches in ((alone, mine), (batched, theirs)):
            for c, a, k in zip(caches, at, keep):
                model.rewind(c, a + k)
    assert [c.length for c in theirs] == [c.length for c in mine]
    assert {(4, 4), (4, 5), (4, 2)} <= set(batched._batch_steps)  # the batched path ran, padded to 4


@pytest.mark.skipif(not gpu_kernels.available(), reason="needs Triton")
def test_pooled_sequences_joining_and_leaving_a_batch_keep_their_own_greedy_tokens():
    from specdec.batching import BatchStepper

    alone, batched = _fused_pair(sequences=2)  # the third request gets a slot of its own: eager batches
    plain = [Engine(alone, drafter="ngram").start(p, SamplingParams(max_new_tokens=n, num_draft_tokens=k)).run().token_ids
             for p, n, k in zip(PROMPTS[:4], (12, 6, 10, 8), (3, None, 2, 0))]
    engine = Engine(batched, drafter="ngram")
    waiting = [(p, SamplingParams(max_new_tokens=n, num_draft_tokens=k))
               for p, n, k in zip(PROMPTS[:4], (12, 6, 10, 8), (3, None, 2, 0))]
    stepper, running, finished = BatchStepper(batched), [], {}
    while waiting or running:
        if waiting and len(running) < 3:  # one joins per step, while others run
            running.append(engine.start(*waiting.pop(0)))
        assert not any(isinstance(r, BaseException) for r in stepper.step(running))
        for g in [g for g in running if g.finished]:
            finished[id(g)] = g
            running.remove(g)
    outputs = sorted((g.output().token_ids for g in finished.values()), key=len)
    assert outputs == sorted(plain, key=len)
    assert batched._batch_steps


@pytest.mark.skipif(not gpu_kernels.available(), reason="needs Triton")
def test_prompts_joining_a_pooled_batch_share_its_pass_and_give_each_sequence_its_own_logits():
    alone, batched = _fused_pair(sequences=4)
    ids = torch.randint(3, tiny.VOCAB, (4, 60), generator=torch.Generator().manual_seed(5)).to(DEVICE)
    mine, theirs = [alone.new_cache() for _ in range(4)], [batched.new_cache() for _ in range(4)]
    for i, n in enumerate((7, 12)):  # two running sequences; two new ones bring their prompts
        alone.prefill(ids[i, :n], mine[i])
        batched.prefill(ids[i, :n], theirs[i])
    alone_passes = []  # sequences that ran a pass of their own
    forward = batched.forward
    batched.forward = lambda *args: alone_passes.append(1) or forward(*args)
    # a prompt wider than a graph step, a running sequence's k+1, another prompt, a single token
    feeds = [(2, 0, GRAPH_MAX_TOKENS + 20), (0, 7, 3), (3, 0, GRAPH_MAX_TOKENS + 3), (1, 12, 1)]
    for round_ in range(2):  # then every sequence steps on from where the shared pass left it
        expected = [alone.forward(ids[i, a : a + n], mine[i], min(n, 3)) for i, a, n in feeds]
        got = batched.forward_batch([ids[i, a : a + n] for i, a, n in feeds], [theirs[i] for i, _, _ in feeds],
                                    [min(n, 3) for _, _, n in feeds])
        for e, g in zip(expected, got):
            assert g.shape == e.shape and float((e - g).abs().max()) < 1e-4
        assert [theirs[i].length for i, _, _ in feeds] == [mine[i].length for i, _, _ in feeds]
        if round_ == 0:
            assert not alone_passes  # the prompts and the batch: one pass
            feeds = [(i, mine[i].length, n) for i, n in ((2, 2), (0, 4), (3, 1), (1, 3))]


@pytest.mark.parametrize("kernels", [False, True])
@pytest.mark.parametrize("k", [2, 6])
@pytest.mark.parametrize("int8", [False, True])
def test_feature_head_on_the_graph_path_gives_the_plain_output(kernels, k, int8):
    """A feature head beside a graph-decoder target (draft_models/feature_head.py): its steps
    are captured graphs on CUDA that read staged features; a long prompt's catch-up runs the
    packed pass. Drafts are accepted (a copy of the one-layer target's layer; int8: its weights
    in int8, the skinny int8 kernel on CUDA) and output equals the path's plain output."""
    from specdec.backends.layers import Int8Weight
    from specdec.draft_models.feature_head import GraphFeatureDecoder

    if kernels and DEVICE == "cpu":
        pytest.skip("the fused kernels in Triton's interpreter: covered on CUDA")
    model = tiny.llama(0, layers=1, dtype=DTYPE).to(DEVICE)
    target = GraphDecoder(model, "static", DTYPE, set(), tiny.VOCAB, 256, kernels=kernels or None)
    head = GraphFeatureDecoder(tiny.feature_head(model.cpu(), copy=True), target, torch.arange(tiny.VOCAB), "head",
                               int8=int8)
    assert isinstance(head._fc, Int8Weight) is int8
    model.to(DEVICE)
    engine = Engine(target, drafter="feature", draft_model=head)
    long_prompt = [1] + torch.randint(3, tiny.VOCAB, (GRAPH_MAX_TOKENS + 5,),
                                      generator=torch.Generator().manual_seed(0)).tolist()
    accepted = 0
    for prompt in PROMPTS + [long_prompt]:
        plain = engine.generate(prompt, max_new_tokens=40, num_draft_tokens=0).token_ids
        out = engine.generate(prompt, max_new_tokens=40, num_draft_tokens=k)
        assert out.token_ids == plain, f"prompt {prompt}"
        accepted += out.stats.accepted_tokens
    assert accepted > 100



@pytest.mark.parametrize("kernels", [False, True])
@pytest.mark.parametrize("copy", [False, True])
def test_a_feature_heads_greedy_rollout_drafts_what_its_steps_one_by_one_draft(kernels, copy):
    """GraphFeatureDecoder.greedy_rollout (the greedy steps after a proposal's first, one
    captured graph each, with the pick and the staging inside) proposes token for token what
    the drafter's one-forward-per-step loop proposes, step after step through verdicts and
    rewinds; with a random head (drafts mostly rejected) and a copied one (mostly accepted)."""
    from specdec.draft_models.feature_head import GraphFeatureDecoder
    from specdec.drafters.feature import FeatureDrafter
    from specdec.generation import Generation

    if kernels and DEVICE == "cpu":
        pytest.skip("the fused kernels in Triton's interpreter: covered on CUDA")
    model = tiny.llama(0, layers=1, dtype=DTYPE).to(DEVICE)
    target = GraphDecoder(model, "static", DTYPE, set(), tiny.VOCAB, 256, kernels=kernels or None)
    head = GraphFeatureDecoder(tiny.feature_head(model.cpu(), copy=copy), target, torch.arange(tiny.VOCAB), "head")
    model.to(DEVICE)

    def drafts(rollout: bool, prompt: list[int], k: int) -> list[list[int]]:
        drafter = FeatureDrafter(head, rollout=rollout)
        assert drafter._rolls_out is rollout
        proposed = []
        with Generation(target, drafter, prompt, SamplingParams(max_new_tokens=40, num_draft_tokens=k), None) as gen:
            while not gen.finished:
                step = gen.draft()
                proposed.append(step.proposal.tokens.tolist())
                gen.conclude(step, target.forward(step.verify_ids, gen.cache, step.num_logits))
        return proposed

    for prompt, k in zip(PROMPTS[:4], (2, 4, 6, 8)):
        one_by_one = drafts(False, prompt, k)
        assert drafts(True, prompt, k) == one_by_one, f"prompt {prompt}, k {k}"
        assert len(one_by_one) > 3 and max(len(d) for d in one_by_one) == k
