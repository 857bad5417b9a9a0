from __future__ import annotations

import json
import subprocess
import sys


def run_cli(*args, input_text=None):
    return subprocess.run([sys.executable, "-m", "specdec.cli", *args], capture_output=True, text=True,
                          input=input_text, timeout=180)


def test_generate_json_has_text_tokens_and_stats(tiny_model_dir, tiny_draft_dir):
    proc = run_cli("generate", "--target", str(tiny_model_dir), "--draft", str(tiny_draft_dir),
                   "--prompt", "the quick brown fox", "--max-new-tokens", "24", "--num-draft-tokens", "3", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert len(out["token_ids"]) == out["stats"]["generated_tokens"] > 0
    for field in ("acceptance_rate", "mean_accepted_length", "per_position_acceptance", "target_forward_passes",
                  "draft_forward_passes", "wall_time_s", "tokens_per_second", "provenance", "drafted_tokens",
                  "accepted_tokens"):
        assert field in out["stats"]


def test_generate_streams_text_then_summary_and_reads_stdin(tiny_model_dir):
    proc = run_cli("generate", "--target", str(tiny_model_dir), "--max-new-tokens", "16", input_text="the lazy dog")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()
    assert "acceptance" in proc.stderr and "tok/s" in proc.stderr


def test_generate_json_matches_api(tiny_model_dir):
    import specdec

    api = specdec.load(target=str(tiny_model_dir), device="cpu").generate("def add(a, b):", max_new_tokens=20)
    proc = run_cli("generate", "--target", str(tiny_model_dir), "--prompt", "def add(a, b):",
                   "--max-new-tokens", "20", "--json")
    assert json.loads(proc.stdout)["token_ids"] == api.token_ids


def test_chat_uses_the_template(tiny_model_dir):
    proc = run_cli("generate", "--target", str(tiny_model_dir), "--chat", "--prompt", "hello",
                   "--max-new-tokens", "8", "--json")
    assert proc.returncode == 0, proc.stderr


def test_generate_takes_penalties_and_logit_biases_as_the_api_does(tiny_model_dir):
    import specdec

    api = specdec.load(target=str(tiny_model_dir), device="cpu").generate(
        "the quick", max_new_tokens=12, presence_penalty=0.5, frequency_penalty=1.0, logit_bias={7: 2.5})
    proc = run_cli("generate", "--target", str(tiny_model_dir), "--prompt", "the quick", "--max-new-tokens", "12",
                   "--presence-penalty", "0.5", "--frequency-penalty", "1.0", "--logit-bias", "7:2.5", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["token_ids"] == api.token_ids
    forced = run_cli("generate", "--target", str(tiny_model_dir), "--prompt", "the quick", "--max-new-tokens", "4",
                     "--logit-bias", "11:100", "--json")
    assert json.loads(forced.stdout)["token_ids"] == [11] * 4


SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age"],
          "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer", "minimum": 0, "maximum": 99}}}


def test_generate_follows_a_json_schema_file_as_the_api_does(tiny_model_dir, tmp_path):
    import jsonschema

    import specdec

    schema_file = tmp_path / "person.json"
    schema_file.write_text(json.dumps(SCHEMA))
    response_format = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
    api = specdec.load(target=str(tiny_model_dir), device="cpu").generate(
        "the quick", max_new_tokens=60, response_format=response_format)
    proc = run_cli("generate", "--target", str(tiny_model_dir), "--prompt", "the quick", "--max-new-tokens", "60",
                   "--json-schema", str(schema_file), "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["token_ids"] == api.token_ids
    jsonschema.validate(json.loads(out["text"]), SCHEMA)
    regex = run_cli("generate", "--target", str(tiny_model_dir), "--prompt", "the quick", "--regex", "[0-9]{4}",
                    "--max-new-tokens", "10", "--json")
    assert json.loads(regex.stdout)["text"].isdigit()


def test_generate_refuses_a_bad_schema_or_regex_by_name(tiny_model_dir, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    for args, message in [(("--json-schema", str(bad)), "not JSON"), (("--json-schema", str(tmp_path / "none")),
                                                                      "cannot read"),
                          (("--regex", "[a-"), "bad regex")]:
        proc = run_cli("generate", "--target", str(tiny_model_dir), "--prompt", "the quick", *args)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
