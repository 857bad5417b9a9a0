"""A tiny benchmark on tiny models: every column of the report is there and outputs matched."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from specdec.bench.report import COLUMNS
from specdec.bench.workloads import BUILTIN, load_workload
from specdec.errors import SpecDecError


def test_tiny_bench_writes_report_with_every_column(tiny_model_dir, tiny_draft_dir, tmp_path):
    workload = tmp_path / "w.jsonl"
    workload.write_text('{"prompt": "the quick brown fox jumps over the lazy dog the quick", "category": "grounded"}\n'
                        '{"prompt": "def add(a, b):", "category": "code"}\n'
                        '{"messages": [{"role": "user", "content": "hello"}], "category": "chat"}\n')
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "specdec.cli", "bench", "--target", str(tiny_model_dir),
                           "--draft", str(tiny_draft_dir), "--drafter", "ngram,model,self,ngram+self",
                           "--workload", str(workload), "--max-new-tokens", "12",
                           "--repeats", "2", "--num-draft-tokens", "2,adaptive", "--out", str(out), "--quiet"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    for _, title, _ in COLUMNS:
        assert title in proc.stdout
    results = json.loads((out / "results.json").read_text())
    runs = {row["run"] for row in results["summary"]}
    assert {"specdec-plain", "specdec-ngram k=2", "specdec-model k=adaptive", "hf-plain", "hf-prompt-lookup",
            "hf-assisted", "specdec-self k=2", "specdec-ngram+self k=adaptive"} <= runs
    for row in results["summary"]:
        for key in ("median_latency_s", "latency_ratio", "speedup", "tokens_per_s", "peak_memory_mb", "identical"):
            assert key in row
        if row["run"].startswith("specdec"):
            assert row["identical"] == 1.0, row  # greedy speculative output == plain output
            assert row["compute_ratio"] is not None and row["mean_accepted_length"] >= 1.0
    config = results["config"]
    assert len(config["verify_cost_ms"]) == 9 and all(t > 0 for t in config["verify_cost_ms"])
    for row in (r for r in results["summary"] if r["category"] == "all"):  # where the draft cost is known
        has_ideal = row["run"].startswith(("specdec-ngram k", "specdec-model", "specdec-self"))
        assert ("ideal_speedup" in row) == has_ideal, row["run"]
        if has_ideal:
            assert row["ideal_speedup"] >= 1.0 and row["of_ideal"] > 0
    assert "Verify-cost curve" in (out / "report.md").read_text()
    for name in ("report.md", "speedup_by_category.png", "acceptance_by_position.png", "speedup_vs_k.png"):
        assert (out / name).stat().st_size > 0
    assert "| run |" in (out / "report.md").read_text()
    against = {(row["run"], row["peer"]) for row in results["against_peers"]}
    assert ("specdec-ngram k=2", "hf-assisted") in against and ("specdec-plain", "hf-plain") in against
    assert "against each peer" in proc.stdout and "Against each peer" in (out / "report.md").read_text()


def test_serving_bench_reports_every_load_point_and_speculative_outputs_match_plain(tiny_model_dir, tiny_draft_dir,
                                                                                  tmp_path):
    out, workload = tmp_path / "serve", tmp_path / "w.jsonl"
    workload.write_text('{"prompt": "the quick brown fox jumps over the lazy dog the quick"}\n'
                        '{"prompt": "def add(a, b):"}\n{"prompt": "speculative decoding drafts tokens"}\n')
    proc = subprocess.run([sys.executable, "-m", "specdec.cli", "bench", "--serve", "--target", str(tiny_model_dir),
                           "--draft", str(tiny_draft_dir), "--drafter", "ngram,model", "--workload", str(workload),
                           "--max-new-tokens", "10", "--repeats", "1", "--concurrency", "1,3",
                           "--request-rate", "50", "--requests", "5", "--out", str(out), "--quiet"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads((out / "serving.json").read_text())["rows"]
    assert {(r["run"], r["pattern"], r["concurrency"]) for r in rows} == {
        (run, pattern, c) for run in ("plain", "ngram", "model") for pattern, c in (("closed", 1), ("closed", 3),
                                                                                   ("open", 3))}
    for row in rows:
        assert row["requests"] == 5 and 0 < row["generated_tokens"] <= 50 and row["tokens_per_s"] > 0
        assert row["identical"] == 1.0, row  # each greedy request equals its plain run
        assert row["latency_p50_s"] <= row["latency_p95_s"] and row["ttft_p50_s"] <= row["latency_p95_s"]
        if (row["pattern"], row["concurrency"]) == ("closed", 1):  # one slot, busy at every step
            assert row["full_tokens"] == row["generated_tokens"] and row["full_tokens_per_s"] > 0
    assert "vs plain" in proc.stdout and "full vs plain" in proc.stdout and "| run |" in (out / "serving.md").read_text()


def test_serving_bench_control_reruns_plain_and_each_repeat_is_paired_with_a_plain_run(tiny_model_dir, tmp_path):
    out, workload = tmp_path / "serve", tmp_path / "w.jsonl"
    workload.write_text('{"prompt": "the quick brown fox jumps over the lazy dog the quick"}\n'
                        '{"prompt": "one two three one two three one two"}\n')
    proc = subprocess.run([sys.executable, "-m", "specdec.cli", "bench", "--serve", "--target", str(tiny_model_dir),
                           "--drafter", "ngram", "--workload", str(workload), "--max-new-tokens", "8",
                           "--repeats", "2", "--concurrency", "2", "--control", "--out", str(out), "--quiet"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = {r["run"]: r for r in json.loads((out / "serving.json").read_text())["rows"]}
    assert set(rows) == {"plain", "ngram", "plain-again"}
    assert rows["plain-again"]["identical"] == 1.0 and rows["plain-again"]["mean_draft_tokens"] == 0
    # Plain decoding verifies one position per token; a draft adds the positions it rejects.
    assert rows["plain"]["target_positions_per_token"] == rows["plain-again"]["target_positions_per_token"] == 1.0
    assert rows["ngram"]["target_positions_per_token"] >= 1.0
    for name in ("ngram", "plain-again"):
        row = rows[name]
        low, high = map(float, row["ratio_range"].split("-"))
        assert len(row["paired_ratios"]) == 2 and (low, high) == tuple(round(r, 2) for r in sorted(row["paired_ratios"]))
        assert low - 0.005 <= row["throughput_ratio"] <= high + 0.005  # two repeats: their ratio of sums lies between
    assert rows["plain"]["ratio_range"] is None and "rows/tok" in proc.stdout and "range" in proc.stdout
    assert "'plain-again' (--control)" in (out / "serving.md").read_text()


def test_full_slot_throughput_counts_only_steps_with_every_slot_busy(tiny_model_dir):
    import specdec
    from specdec.bench.serving import serve

    engine = specdec.load(target=str(tiny_model_dir), drafter="ngram", device="cpu")
    prompts = [engine.tokenizer.encode(t) for t in ("the quick brown fox", "def add(a, b):", "one two three")]
    never_full, _ = serve(engine, prompts[:2], 6, concurrency=3)  # two requests never fill three slots
    assert never_full.full_tokens == 0 and never_full.full_tokens_per_s is None
    point, tokens = serve(engine, prompts * 2, 6, concurrency=4)  # six requests: four, then a drain
    assert 0 < point.full_tokens < point.generated_tokens == sum(map(len, tokens))
    assert point.full_tokens_per_s > 0


@pytest.mark.parametrize("flags", [["--concurrency", "0"], ["--concurrency", "two"], ["--request-rate", "-1"]])
def test_serving_bench_refuses_bad_loads(tiny_model_dir, flags):
    proc = subprocess.run([sys.executable, "-m", "specdec.cli", "bench", "--serve", "--target", str(tiny_model_dir),
                           "--workload", "grounded", "--limit", "1", *flags], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0 and "expected" in proc.stderr and "Traceback" not in proc.stderr


def test_against_peers_is_the_median_and_least_per_prompt_speedup_by_time_per_token():
    from specdec.bench.runner import BenchResults, Measurement, against_peers

    def measured(prompt, run, kind, seconds, tokens):
        return Measurement(prompt, "code", run, kind, 0, seconds, tokens, None, None, 0.0)

    results = BenchResults({}, ["specdec-plain", "specdec-ngram", "peer-plain"], [
        measured("a", "specdec-plain", "baseline", 1.0, 10), measured("a", "specdec-ngram", "specdec", 0.5, 10),
        measured("a", "peer-plain", "peer", 0.5, 4),  # stopped early: 0.125 s a token against 0.05
        measured("b", "specdec-plain", "baseline", 1.0, 10), measured("b", "specdec-ngram", "specdec", 0.25, 10),
        measured("b", "peer-plain", "peer", 1.0, 10),
        measured("c", "specdec-plain", "baseline", 1.0, 10), measured("c", "specdec-ngram", "specdec", 1.0, 10),
        measured("c", "peer-plain", "peer", 0.5, 10)])
    rows = {row["run"]: row for row in against_peers(results)}
    assert set(rows) == {"specdec-plain", "specdec-ngram"} and rows["specdec-ngram"]["peer"] == "peer-plain"
    assert rows["specdec-ngram"]["median"] == pytest.approx(2.5)  # per prompt: 2.5, 4.0, 0.5
    assert rows["specdec-ngram"]["least"] == pytest.approx(0.5) and rows["specdec-ngram"]["prompts"] == 3


def test_builtin_workloads_cover_the_three_kinds():
    prompts = load_workload("all")
    assert {p.category for p in prompts} == {"grounded", "code", "open-ended"}
    assert len(load_workload("grounded", limit=2)) == 2 and set(BUILTIN) == {"grounded", "code", "open"}


def test_the_json_workload_gives_each_prompt_its_schema_and_bench_runs_it_against_constrained_plain(
        tiny_model_dir, tmp_path):
    prompts = load_workload("json")
    assert len(prompts) == 12 and all(p.response_format["type"] == "json_schema" for p in prompts)
    assert not any(p.response_format for p in load_workload("all"))  # 'all' stays unconstrained
    workload = tmp_path / "w.jsonl"
    schema = {"type": "object", "additionalProperties": False, "required": ["a"],
              "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9}}}
    workload.write_text(json.dumps({"prompt": "the quick brown fox", "category": "json", "response_format": {
        "type": "json_schema", "json_schema": {"name": "a", "schema": schema}}}) + "\n")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "specdec.cli", "bench", "--target", str(tiny_model_dir),
                           "--drafter", "ngram", "--workload", str(workload), "--max-new-tokens", "24",
                           "--repeats", "1", "--out", str(out), "--quiet"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    results = json.loads((out / "results.json").read_text())
    # the peers take no response_format: only specdec's runs, each output the constrained plain one
    assert {m["run"] for m in results["measurements"]} == {"specdec-plain", "specdec-ngram"}
    for m in results["measurements"]:
        assert m["identical_to_baseline"] and m["stats"]["finish_reason"] == "stop"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response_format": {"type": "regex"}}\n')
    with pytest.raises(SpecDecError, match="line 1: a regex response_format needs"):
        load_workload(str(bad))


def test_bad_workloads_are_clear_errors(tmp_path):
    with pytest.raises(SpecDecError, match="neither a file nor a built-in"):
        load_workload("nope")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"category": "x"}\n')
    with pytest.raises(SpecDecError, match="line 1"):
        load_workload(str(bad))
    for text, message in (('{"prompt": "a"}\n{broken\n', "line 2: not JSON"), ('["a list"]\n', "line 1: needs a JSON object")):
        bad.write_text(text)
        with pytest.raises(SpecDecError, match=message):
            load_workload(str(bad))


def test_ideal_speedup_is_the_seed_formula():
    from specdec.bench.ideal import ideal_speedup

    flat = [10.0] * 9  # verifying costs what one step costs
    assert ideal_speedup(0.0, flat, 0.0, 4) == 1.0  # nothing accepted: speculation off
    assert ideal_speedup(1.0, flat, 0.0, 4) == 5.0  # all accepted: k + 1 tokens per pass
    # alpha = 0.5, k = 2: E = 1 + 0.5 + 0.25 = 1.75 tokens; cost 12 + 2 x 1 = 14 against 10 a step
    curve = [10.0, 11.0, 12.0, 13.0]
    assert ideal_speedup(0.5, curve, 1.0, 2) == pytest.approx(1.75 * 10 / 14)
    # adaptive: the best k; here k = 1 (1.5 x 10 / 12 = 1.25) beats k = 2 (1.25) and k = 3 (1.14)
    assert ideal_speedup(0.5, curve, 1.0, None) == pytest.approx(max(1.5 * 10 / 12, 1.75 * 10 / 14, 1.875 * 10 / 16))


@pytest.mark.heavy
def test_soak_loses_nothing_leaks_nothing_and_texts_equal_requests_alone(tiny_model_dir, tmp_path):
    """A short `bench --soak`: 8 streams for 8 s on the tiny model, 30 % hanging up."""
    proc = subprocess.run([sys.executable, "-m", "specdec.cli", "bench", "--soak", "8", "--streams", "8",
                           "--disconnect-rate", "0.3", "--max-new-tokens", "24", "--target", str(tiny_model_dir),
                           "--drafter", "ngram", "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((tmp_path / "soak.json").read_text())
    assert result["requests"] == result["completed"] + result["disconnected"] + result["lost"]
    assert result["completed"] >= 8 and result["disconnected"] >= 1
    assert result["lost"] == 0 and result["running_after"] == 0 and result["queued_after"] == 0
    assert result["identical_to_alone"] == result["completed"]  # greedy, exact on this backend


def test_soak_refuses_bad_settings(tiny_model_dir):
    proc = subprocess.run([sys.executable, "-m", "specdec.cli", "bench", "--soak", "5", "--disconnect-rate", "1.5",
                           "--target", str(tiny_model_dir)], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "disconnect-rate" in proc.stderr
