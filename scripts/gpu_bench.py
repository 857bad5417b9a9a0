"""GPU check-and-time script: one call of the device tool runs it all and writes under $OUT.

1. Exactness on CUDA: tiny models, greedy speculative output == the same path's plain output
   (n-gram, self-as-draft, random draft; several k), on the CUDA-graph path and on eager
   transformers.
2. Step costs and end-to-end speed with random-weight Llama-3.1-8B (target) and
   Llama-3.2-1B (draft) shapes in bf16: specdec plain, specdec speculative with synthetic
   acceptance alpha in {0.6, 0.8, 0.9} x k in {2, 4, 6, 8} against the ideal
   S = E[accepted + 1] * T_target / (T_verify(k) + k * T_draft) (set against the decode speedup:
   both runs less the prompt's pass, which S leaves out), and transformers' generate()
   plain, static-cache compiled, and assisted with the target as its own assistant.

Plain decoding is timed with and without GreedyChain and programmatic dependent launch; each
(alpha, k) pools --repeats runs of fresh draws, each paired with a plain run just before it.

Usage (device tool): PYTHONPATH=src python3 scripts/gpu_bench.py [--quick] [--no-compile] [--repeats N]
(scripts/gpu_profile.py: kernels of a step or a prefill; scripts/gpu_host_gaps.py: GPU idle time
in the speculative loop)
(run `python3 -m pytest tests/backends/test_graph_decoder.py` first: the graph tests need a GPU)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from specdec import Engine, SamplingParams  # noqa: E402
from specdec.drafters.model import ModelDrafter  # noqa: E402
from specdec.drafters.synthetic import SyntheticDrafter  # noqa: E402
from specdec.generation import Generation  # noqa: E402
from specdec.kernels import gpu_kernels  # noqa: E402
from specdec.backends.graph_decoder import GraphDecoder, graph_decoder_for  # noqa: E402
from specdec.backends.hf import HFCausalLM  # noqa: E402

OUT = Path(os.environ.get("OUT", "gpu-out"))
HBM_SPEC_BPS = {"H100": 3.35e12, "H200": 4.8e12}  # datasheet bandwidth: the floor
SHAPES = {
    "8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=14336),
    "1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=8192),
}


def llama(shape: str, vocab: int, seed: int, dtype=torch.bfloat16, layers: int | None = None,
          decisive: bool = False, device: str | torch.device = "cuda"):
    torch.manual_seed(seed)
    cfg = dict(SHAPES[shape]) if shape in SHAPES else dict(hidden_size=64, num_hidden_layers=2,
                                                          num_attention_heads=4, num_key_value_heads=2,
                                                          intermediate_size=128)
    if layers:
        cfg["num_hidden_layers"] = layers
    # decisive: random weights give near-flat logits whose argmax flips with the matmul shape
    # (verify vs single step), which makes any planted acceptance meaningless. Scaling the
    # attention and MLP output projections down leaves the residual stream dominated by the
    # current token's embedding, and a head equal to the embedding (a copy, not tied: the
    # head's bytes are still read) makes "repeat the current token" win by a wide margin.
    # Shapes, bytes read and kernels are those of the real architecture.
    config = LlamaConfig(vocab_size=vocab, max_position_embeddings=4096, bos_token_id=1, eos_token_id=None,
                         tie_word_embeddings=False, **cfg)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype).eval()
    if decisive:
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.o_proj.weight.mul_(1e-3)
                layer.mlp.down_proj.weight.mul_(1e-3)
            model.lm_head.weight.copy_(model.get_input_embeddings().weight)
    model.generation_config.eos_token_id = None
    return model


def sync_time(fn):
    torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start, result


def check_exactness() -> dict:
    """Greedy speculative output == the same path's plain output, on CUDA, for both paths."""
    results = {}
    for path in ("graphs", "transformers"):
        def wrap(seed: int, name: str):
            model = HFCausalLM(llama("tiny", 512, seed, torch.float32), name, eos_token_ids=set())
            return graph_decoder_for(model) if path == "graphs" else model
        target, other = wrap(0, "tiny"), wrap(1, "other")
        prompts = [[1, 5, 9, 5, 9, 5, 9, 33], [1] + list(range(100, 140)), [1, 42]]
        for name, engine in [("ngram", Engine(target, drafter="ngram")),
                             ("self-as-draft", Engine(target, drafter="model", draft_model=target)),
                             ("random-draft", Engine(target, drafter="model", draft_model=other))]:
            ok = True
            for k in (1, 4, 8, None):
                for p in prompts:
                    plain = engine.generate(p, max_new_tokens=48, num_draft_tokens=0).token_ids
                    ok &= engine.generate(p, max_new_tokens=48, num_draft_tokens=k).token_ids == plain
            results[f"{path}/{name}"] = ok
    return results


def timed_generation(target, drafter, prompt, new_tokens, k, chained: bool = True):
    """chained=False: plain decoding with host and device in lock step (no GreedyChain)."""
    params = SamplingParams(max_new_tokens=new_tokens, num_draft_tokens=k)
    generation = Generation(target, drafter, prompt, params, None)
    generation._chained &= chained
    elapsed, out = sync_time(generation.run)
    return elapsed, out


def median_generation(target, make_drafter, prompt, new_tokens, k, repeats: int, chained: bool = True):
    runs = [timed_generation(target, make_drafter(), prompt, new_tokens, k, chained) for _ in range(repeats)]
    runs.sort(key=lambda run: run[0])
    return runs[len(runs) // 2]


def speculative_row(target, make_drafter, prompt, plain, new_tokens, alpha, k, repeats, t_costs,
                    draft_step_s, prompt_s) -> dict:
    """One (alpha, k) point: speculative runs, each paired with a plain run just before it, pooled.

    Plain and speculative runs alternate, and each speculative run is set against the plain run
    just before it: a shared machine's drift (its host CPU most of all: the speculative loop does
    more host work per token than chained plain decoding) then falls on both sides of each ratio.
    The speedup is pooled over the runs (total plain time over total speculative time), each run
    with its own draws, so that it estimates the expectation the ideal is.

    `speedup` is end to end: both runs also read the prompt (prompt_s, the same pass in both).
    The ideal S is a ratio of decoding steps, so `of_ideal` sets it against `decode_speedup`,
    both runs less the prompt's pass: at alpha 0.9 a 512-token prompt's ~25 ms is ~7 % of a
    speculative run, which the end-to-end ratio counts against speculation."""
    plain_t = elapsed = 0.0
    tokens = passes = accepted = drafted = 0
    identical = True
    for _ in range(repeats):
        plain_t += timed_generation(target, None, prompt, new_tokens, 0)[0]
        t, run = timed_generation(target, make_drafter(), prompt, new_tokens, k)
        elapsed += t
        tokens += run.stats.generated_tokens
        passes += run.stats.target_forward_passes
        accepted += run.stats.accepted_tokens
        drafted += run.stats.drafted_tokens
        identical &= run.token_ids == plain.token_ids
    expected_len = sum(alpha ** i for i in range(k + 1))
    verify = t_costs.get(k + 1) or step_costs(target, prompt, sizes=(k + 1,))[k + 1]
    per_step = t_costs[1] / (verify + k * draft_step_s)
    speedup = plain_t / elapsed
    decode_speedup = (plain_t - repeats * prompt_s) / (elapsed - repeats * prompt_s)
    return {"alpha": alpha, "k": k, "speedup": speedup, "decode_speedup": decode_speedup,
            "ideal": expected_len * per_step, "of_ideal": decode_speedup / (expected_len * per_step),
            "end_to_end_of_ideal": speedup / (expected_len * per_step),  # the prompt's pass counted (before session 22)
            # the same against the acceptance the runs drew rather than alpha's expectation
            "of_ideal_at_drawn_acceptance": decode_speedup / (tokens / passes * per_step),
            "tok_s": repeats * new_tokens / elapsed, "acceptance": accepted / drafted,
            "mean_accepted_length": tokens / passes, "expected_length": expected_len, "runs": repeats,
            "identical_to_plain": identical}


def step_costs(model, prompt: list[int], sizes=(1, 2, 3, 5, 7, 9)) -> dict[int, float]:
    """Median seconds of one forward feeding n tokens after the prompt (graph replays)."""
    cache = model.new_cache()
    model.prefill(torch.tensor(prompt[:-1]), cache)
    base = model.cache_length(cache)
    costs = {}
    for n in sizes:
        ids = torch.tensor(prompt[-1:] + [7] * (n - 1), device="cuda")
        samples = []
        for _ in range(25):
            t, _ = sync_time(lambda: model.forward(ids, cache, n))
            model.rewind(cache, base)
            samples.append(t)
        costs[n] = statistics.median(samples[5:])
    return costs


def prompt_seconds(model, prompt: list[int]) -> float:
    """Median seconds of the prompt's pass (what a generation reads before its first step)."""
    samples = []
    for _ in range(7):
        cache = model.new_cache()
        samples.append(sync_time(lambda: model.prefill(torch.tensor(prompt[:-1]), cache))[0])
        model.release(cache)
    return statistics.median(samples[2:])


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read plus written per second: the measured HBM ceiling."""
    source = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    target = torch.empty_like(source)
    samples = [sync_time(lambda: target.copy_(source))[0] for _ in range(10)]
    return 2 * (2 << 30) / statistics.median(samples[2:])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="4 layers and fewer tokens (smoke test)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-compile", action="store_true", help="skip transformers' compiled static-cache peer")
    parser.add_argument("--plain-only", action="store_true", help="stop after plain decoding and the step costs")
    parser.add_argument("--no-exactness", action="store_true", help="skip the tiny-model exactness checks")
    parser.add_argument("--feature-only", action="store_true",
                        help="after plain decoding, only the feature head's table (the 8B's shape: one layer, 32k head)")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    import transformers
    report: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                    "transformers": transformers.__version__, "cuda": torch.version.cuda,
                    "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    try:
        import subprocess
        report["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                          capture_output=True, text=True).stdout.strip()
    except OSError:
        pass
    if not args.no_exactness:
        report["exactness"] = check_exactness()
        print("exactness on cuda:", report["exactness"], flush=True)
    report["copy_TBps"] = copy_bandwidth() / 1e12

    vocab, prompt_len, new_tokens = 128256, 512, (64 if args.quick else 256)
    layers = 4 if args.quick else None
    target_hf = llama("8b", vocab, 0, layers=layers, decisive=True)
    capacity = 1024  # prompt + new tokens + the largest verify, rounded up
    target = graph_decoder_for(HFCausalLM(target_hf, "8b", eos_token_ids=set()), capacity)
    if not args.feature_only:
        draft_hf = llama("1b", vocab, 1, layers=layers, decisive=True)
        draft = graph_decoder_for(HFCausalLM(draft_hf, "1b", eos_token_ids=set()), capacity)
        assert isinstance(draft, GraphDecoder)
    assert isinstance(target, GraphDecoder)
    report["kernels"] = {"target": target.kernels}
    # bytes read per decode step: every parameter once (the tied table is read as the head)
    weight_bytes = sum(p.numel() * p.element_size() for p in target_hf.parameters())
    spec_bps = next((bps for name, bps in HBM_SPEC_BPS.items() if name in report["device"]), None)
    floor_spec_s = weight_bytes / (spec_bps or report["copy_TBps"] * 1e12)
    torch.manual_seed(0)
    prompt = torch.randint(2, vocab, (prompt_len,)).tolist()

    timed_generation(target, None, prompt, 16, 0)  # warm-up: captures the 1-token graph
    plain_s, plain = median_generation(target, lambda: None, prompt, new_tokens, 0, args.repeats)
    plain_tps = new_tokens / plain_s
    step_s = plain_s / new_tokens
    # Time per output token after the first: the prompt's prefill (compute-bound, eager) and
    # the first step are out of it, so this is the decode rate the HBM floor bounds.
    decode_s = (plain_s - plain.stats.time_to_first_token_s) / (new_tokens - 1)
    report["plain"] = {"tok_s": plain_tps, "step_ms": 1000 * step_s, "weight_GB": weight_bytes / 1e9,
                       "decode_ms_per_token": 1000 * decode_s, "achieved_GBps": weight_bytes / decode_s / 1e9,
                       "of_hbm_floor": floor_spec_s / decode_s, "end_to_end_of_hbm_floor": floor_spec_s / step_s,
                       "floor_ms": 1000 * floor_spec_s}
    print("plain:", report["plain"], flush=True)
    reference = prompt + plain.token_ids

    def plain_variant(name: str, decoder, chained: bool = True) -> None:
        timed_generation(decoder, None, prompt, 16, 0, chained)
        t, out = median_generation(decoder, lambda: None, prompt, new_tokens, 0, args.repeats, chained)
        decode = (t - out.stats.time_to_first_token_s) / (new_tokens - 1)
        report[name] = {"tok_s": new_tokens / t, "step_ms": 1000 * t / new_tokens,
                        "decode_ms_per_token": 1000 * decode, "of_hbm_floor": floor_spec_s / decode,
                        "same_tokens": out.token_ids == plain.token_ids}
        print(f"{name}:", report[name], flush=True)

    # The prompt's pass, which every run (plain or speculative) starts with.
    prompt_s = prompt_seconds(target, prompt)
    report["prefill_ms"] = 1000 * prompt_s
    print("prefill ms:", report["prefill_ms"], flush=True)
    # What each part buys, in the same run: the host one step behind the device (GreedyChain),
    # and programmatic dependent launch between the kernels.
    if args.feature_only:  # straight to the step costs and the feature head's table
        t_costs = step_costs(target, prompt)
        report["target_verify_ms"] = {n: 1000 * t for n, t in t_costs.items()}
        report["feature"] = feature_rows(target, target_hf, prompt, reference, plain, t_costs, vocab, new_tokens,
                                         args.repeats, prompt_s)
        _write(report)
        _print_feature_table(report)
        return
    plain_variant("plain_lock_step", target, chained=False)
    if target.kernels and gpu_kernels._chained():
        os.environ["SPECDEC_GPU_PDL"] = "0"
        gpu_kernels._chained.cache_clear()
        unchained = graph_decoder_for(HFCausalLM(target_hf, "8b", eos_token_ids=set()), capacity)
        plain_variant("plain_without_pdl", unchained)
        del unchained
        del os.environ["SPECDEC_GPU_PDL"]
        gpu_kernels._chained.cache_clear()
    if target.kernels:  # the same path without the Triton kernels: graphs of PyTorch ops
        graphs_only = graph_decoder_for(HFCausalLM(target_hf, "8b", eos_token_ids=set()), capacity, kernels=False)
        plain_variant("plain_graphs_only", graphs_only)
        del graphs_only

    t_costs = step_costs(target, prompt)
    d_costs = step_costs(draft, prompt, sizes=(1,))
    report["target_verify_ms"] = {n: 1000 * t for n, t in t_costs.items()}
    report["draft_step_ms"] = 1000 * d_costs[1]
    print("verify ms:", report["target_verify_ms"], "draft step ms:", report["draft_step_ms"], flush=True)
    if args.plain_only:
        _write(report)
        return

    rows = []
    for alpha in (0.6, 0.8, 0.9):
        for k in (2, 4, 6, 8):
            # A new seed for every run: the ideal is an expectation over the draws, and 256
            # tokens are only ~40-120 draws, so one fixed draw can sit well off it.
            seeds = iter(range(1000 * k, 1000 * k + 100))
            make = lambda: SyntheticDrafter(ModelDrafter(draft), reference, alpha, vocab, seed=next(seeds))  # noqa: E731
            timed_generation(target, make(), prompt, 16, k)  # captures the (k+1)-token graph
            rows.append(speculative_row(target, make, prompt, plain, new_tokens, alpha, k, args.repeats, t_costs,
                                        d_costs[1], prompt_s))
            print(rows[-1], flush=True)
    report["speculative"] = rows

    peers = {}
    timed_generation(target, ModelDrafter(target), prompt, 16, 4)
    t, out = median_generation(target, lambda: ModelDrafter(target), prompt, new_tokens, 4, args.repeats)
    peers["specdec_self_as_draft_k4_tok_s"] = new_tokens / t
    ids = torch.tensor([prompt], device="cuda")
    gen = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
               attention_mask=torch.ones_like(ids), pad_token_id=0)
    target_hf.generate(ids, **{**gen, "max_new_tokens": 8, "min_new_tokens": 8})
    t, _ = sync_time(lambda: target_hf.generate(ids, **gen))
    peers["hf_plain_tok_s"] = new_tokens / t
    t, _ = sync_time(lambda: target_hf.generate(ids, assistant_model=target_hf, **gen))
    peers["hf_assisted_self_tok_s"] = new_tokens / t
    report["peers"] = peers
    print("peers:", peers, flush=True)
    _write(report)
    if not args.no_compile:
        try:
            static = dict(gen, cache_implementation="static")
            target_hf.generate(ids, **{**static, "max_new_tokens": 8, "min_new_tokens": 8})  # compiles
            target_hf.generate(ids, **static)
            t, _ = sync_time(lambda: target_hf.generate(ids, **static))
            peers["hf_static_compiled_tok_s"] = new_tokens / t
        except Exception as exc:  # the compiled path varies across versions; report, don't fail
            peers["hf_static_compiled_error"] = f"{type(exc).__name__}: {exc}"[:300]
        print("peers:", peers, flush=True)
    _write(report)
    _print_table(report)


FEATURE_HEAD_TOKENS = 32768  # the head's rows: the target's for its most frequent tokens


def feature_rows(target, target_hf, prompt, reference, plain, t_costs, vocab, new_tokens, repeats,
                 prompt_s) -> dict:
    """The speculative table with a feature head of the target's shape (one 4096-wide Llama
    layer, fc, a 32k-row head; random weights, so synthetic acceptance sets alpha) in place of
    the 1B draft: the head's steps are captured graphs that read the target's features."""
    from specdec.draft_models.feature_head import FeatureHead, GraphFeatureDecoder, one_layer_config
    from specdec.drafters.feature import FeatureDrafter

    int8 = os.environ.get("FEATURE_INT8") == "1"  # the head's weights in int8 (gpu_kernels.skinny_matmul_int8)
    steps_ms, heads = {}, {}  # both heads' step times; the table runs the chosen one
    for weights in ("bfloat16", "int8"):
        torch.manual_seed(2)
        heads[weights] = GraphFeatureDecoder(FeatureHead(one_layer_config(target_hf.config)), target,
                                             torch.arange(FEATURE_HEAD_TOKENS), "feature-8b", int8=weights == "int8")
        steps_ms[weights] = {how: 1000 * t for how, t in head_step_seconds(heads[weights]).items()}
    chosen = "int8" if int8 else "bfloat16"
    head = heads[chosen]
    width = target_hf.config.hidden_size
    head_bytes = (sum(p.numel() for p in head.head.parameters() if p.dim() == 2) + FEATURE_HEAD_TOKENS * width) * \
        (1 if int8 else 2)
    # The ideal's draft step: a rollout step as the loop runs it, back to back (no host round trip)
    head_step_s = steps_ms[chosen]["in_rollout"] / 1000
    out = {"head_weights": chosen, "head_step_ms": 1000 * head_step_s, "head_step_ms_by_weights": steps_ms,
           "head_MB": head_bytes / 1e6, "head_step_of_target_step": head_step_s / t_costs[1],
           "prefill_ms": 1000 * prompt_s, "rows": []}
    print("feature head:", {k: v for k, v in out.items() if k != "rows"}, flush=True)
    for alpha in (0.6, 0.8, 0.9):
        for k in (2, 4, 5, 6, 8):
            seeds = iter(range(1000 * k, 1000 * k + 100))
            make = lambda: SyntheticDrafter(FeatureDrafter(head), reference, alpha, vocab, seed=next(seeds))  # noqa: E731
            timed_generation(target, make(), prompt, 16, k)  # captures the head's and the verify's graphs
            out["rows"].append(speculative_row(target, make, prompt, plain, new_tokens, alpha, k, repeats, t_costs,
                                               head_step_s, prompt_s))
            print(out["rows"][-1], flush=True)
    return out


def head_step_seconds(head) -> dict[str, float]:
    """One head step, median seconds: `alone`, a one-token forward with its features staged,
    waited for (a host round trip included); `in_rollout`, a step of greedy_rollout among ten
    run back to back, as the loop runs the steps after a proposal's first."""
    cache = head.new_cache()
    cache.features_in = torch.zeros(1, head.feature_size, device="cuda")
    token = torch.tensor([5], device="cuda")
    head.forward(token, cache, 1)
    alone, rolled = [], []
    for _ in range(30):
        cache.features_in = cache.predicted
        alone.append(sync_time(lambda: head.forward(token, cache, 1))[0])
        head.rewind(cache, 1)
        rolled.append(sync_time(lambda: head.greedy_rollout(cache, token, 10))[0] / 10)
        head.rewind(cache, 1)
    head.release(cache)
    return {"alone": statistics.median(alone[5:]), "in_rollout": statistics.median(rolled[5:])}


def _print_feature_table(report: dict) -> None:
    feature = report["feature"]
    print(f"\nplain {report['plain']['tok_s']:.1f} tok/s; prompt's pass {feature['prefill_ms']:.1f} ms; feature head "
          f"({feature['head_weights']}) step {feature['head_step_ms']:.3f} ms in a rollout (by weights: "
          f"{feature['head_step_ms_by_weights']}) ({feature['head_step_of_target_step']:.1%} of a target step), "
          f"{feature['head_MB']:.0f} MB")
    print("| alpha | k | speedup end to end | decode speedup | ideal | of ideal | accepted + 1 (expected) | "
          "of ideal at drawn | end to end of ideal | identical |\n|---|---|---|---|---|---|---|---|---|---|")
    for r in feature["rows"]:
        print(f"| {r['alpha']} | {r['k']} | {r['speedup']:.2f}x | {r['decode_speedup']:.2f}x | {r['ideal']:.2f}x | "
              f"{r['of_ideal']:.0%} | {r['mean_accepted_length']:.2f} ({r['expected_length']:.2f}) | "
              f"{r['of_ideal_at_drawn_acceptance']:.0%} | {r['end_to_end_of_ideal']:.0%} | {r['identical_to_plain']} |")


def _write(report: dict) -> None:
    (OUT / "gpu_bench.json").write_text(json.dumps(report, indent=2))


def _print_table(report: dict) -> None:
    plain, peers = report["plain"], report["peers"]
    print(f"\nplain: {plain['tok_s']:.1f} tok/s with the prompt, {plain['decode_ms_per_token']:.2f} ms per output "
          f"token after the first: {plain['achieved_GBps']:.0f} GB/s = {plain['of_hbm_floor']:.0%} of the HBM floor")
    for name, value in peers.items():
        print(f"{name}: {value if isinstance(value, str) else f'{value:.1f}'}")
    print("\n| alpha | k | speedup end to end | ideal | of ideal (decode) | accepted + 1 (expected) | of ideal at drawn | "
          "tok/s |\n|---|---|---|---|---|---|---|---|")
    for r in report["speculative"]:
        print(f"| {r['alpha']} | {r['k']} | {r['speedup']:.2f}x | {r['ideal']:.2f}x | {r['of_ideal']:.0%} | "
              f"{r['mean_accepted_length']:.2f} ({r['expected_length']:.2f}) | {r['of_ideal_at_drawn_acceptance']:.0%} | "
              f"{r['tok_s']:.0f} |")


if __name__ == "__main__":
    main()
