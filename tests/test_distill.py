"""`specdec distill` end to end on tiny models: training lowers the loss and raises acceptance,
the draft directory loads through the public API, and bad input gets a clear error."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import specdec
from specdec.cli import main
from specdec.errors import SpecDecError, VocabularyMismatchError
from specdec.models.distilled_draft import initial_layers, load_distilled_draft
from specdec.models.loading import load_model

from tiny import llama, tokenizer

SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "def add(a, b):\n    return a + b\n",
    "speculative decoding drafts tokens and the target verifies them",
    "the lazy dog sleeps while the quick fox runs",
    "tokens are drafted, verified and accepted",
]


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("target")
    model = llama(seed=7, layers=3, dtype=torch.float32)
    model.save_pretrained(directory)
    tokenizer(directory)
    return directory


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    rows = [{"text": " ".join(SENTENCES[(i + j) % len(SENTENCES)] for j in range(6))} for i in range(60)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


@pytest.fixture(scope="module")
def distilled(target_dir, data_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("draft")
    code = main(["distill", "--target", str(target_dir), "--data", str(data_file), "--out", str(out),
                 "--layers", "1", "--draft-vocab", "300", "--steps", "120", "--batch-size", "8", "--seq-len", "64",
                 "--lr", "3e-3", "--device", "cpu", "--storage", "int8", "--generated-tokens", "600", "--eval-prompts", "3", "--eval-tokens", "24"])
    assert code == 0
    return out


def test_training_lowers_the_loss_and_raises_acceptance_over_the_untrained_draft(distilled):
    meta = json.loads((distilled / "specdec_draft.json").read_text())
    assert meta["training"]["last_loss"] < 0.5 * meta["training"]["first_loss"]
    rows = {r["name"]: r for r in json.loads((distilled / "evaluation.json").read_text())["rows"]}
    assert rows["distilled draft"]["acceptance_rate"] > rows["untrained draft"]["acceptance_rate"] + 0.1
    assert all(r["identical_to_plain"] for r in rows.values())  # every drafter stays lossless


def test_the_draft_directory_holds_only_what_the_draft_adds(distilled):
    names = {p.name for p in distilled.iterdir()}
    assert {"config.json", "model.safetensors", "token_map.json", "specdec_draft.json"} <= names
    assert "checkpoint.pt" not in names  # removed once training finished
    from safetensors.torch import load_file

    weights = load_file(str(distilled / "model.safetensors"))
    assert not any("embed" in k or "lm_head" in k for k in weights)  # shared with the target at load
    assert len(json.loads((distilled / "token_map.json").read_text())) == 300


@pytest.mark.parametrize("num_draft_tokens", [1, 3, None])
def test_greedy_output_with_the_distilled_draft_equals_plain_decoding(target_dir, distilled, num_draft_tokens):
    engine = specdec.load(target=str(target_dir), draft=str(distilled), device="cpu", cuda_graphs=False)
    plain = engine.with_drafter("none")
    for prompt in ["the quick", "def add(", "tokens are"]:
        expected = plain.generate(prompt, max_new_tokens=30).token_ids
        out = engine.generate(prompt, max_new_tokens=30, num_draft_tokens=num_draft_tokens)
        assert out.token_ids == expected
        assert out.stats.drafted_tokens > 0


def test_resume_continues_from_the_checkpoint(target_dir, data_file, tmp_path):
    args = ["distill", "--target", str(target_dir), "--data", str(data_file), "--out", str(tmp_path),
            "--layers", "1", "--draft-vocab", "300", "--seq-len", "64", "--device", "cpu", "--eval-prompts", "0",
            "--checkpoint-every", "5"]
    with pytest.raises(KeyboardInterrupt):  # stop the first run right after its first checkpoint
        from specdec.distill import train

        original = train._checkpoint

        def checkpoint_then_stop(*a, **k):
            original(*a, **k)
            raise KeyboardInterrupt

        train._checkpoint = checkpoint_then_stop
        try:
            run_uncaught([*args, "--steps", "12"])
        finally:
            train._checkpoint = original
    assert (tmp_path / "checkpoint.pt").exists()
    assert main([*args, "--steps", "12", "--resume"]) == 0
    meta = json.loads((tmp_path / "specdec_draft.json").read_text())
    assert meta["training"]["tokens"] == 12 * 8 * 64  # the interrupted run's 5 steps count too
    assert not (tmp_path / "checkpoint.pt").exists()


def run_uncaught(argv):
    # main() turns KeyboardInterrupt into exit code 130; the test wants to see the interruption.
    from specdec.cli import _parser

    args = _parser().parse_args(argv)
    return args.run(args)


def test_a_draft_for_another_vocabulary_is_refused(distilled, tmp_path):
    other = llama(seed=3, vocab=500, layers=2, dtype=torch.float32)
    other.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path), torch.device("cpu"), torch.float32)
    with pytest.raises(VocabularyMismatchError, match="distilled for another target"):
        load_distilled_draft(distilled, loaded.model, None)


@pytest.mark.parametrize("edit, message", [
    (lambda d: _edit_json(d / "specdec_draft.json", lambda m: m["target"].update(vocabulary_key="0" * 16)),
     "a different tokenizer vocabulary"),
    (lambda d: _edit_json(d / "token_map.json", lambda ids: ids.__setitem__(0, 10**6)), "does not fit"),
    (lambda d: _edit_json(d / "token_map.json", lambda ids: ids.__setitem__(1, ids[0])), "repeated"),
    (lambda d: (d / "model.safetensors").write_bytes(b"garbage"), "cannot read the draft's weights"),
])
def test_a_damaged_or_foreign_draft_directory_gets_a_clear_error(target_dir, distilled, tmp_path, edit, message):
    import shutil

    copy = tmp_path / "draft"
    shutil.copytree(distilled, copy)
    edit(copy)
    loaded = load_model(str(target_dir), torch.device("cpu"), torch.float32)
    with pytest.raises(SpecDecError, match=message):
        load_distilled_draft(copy, loaded.model, loaded.tokenizer)


def _edit_json(path: Path, change) -> None:
    value = json.loads(path.read_text())
    change(value)
    path.write_text(json.dumps(value))


@pytest.mark.parametrize("extra, message", [
    (["--draft-vocab", "100000"], "larger than the target's vocabulary"),
    (["--seq-len", "1000000"], "shorter than one training sequence"),
    (["--layers", "9"], "has only 3 layers"),
])
def test_bad_settings_get_a_clear_error(target_dir, data_file, tmp_path, capsys, extra, message):
    code = main(["distill", "--target", str(target_dir), "--data", str(data_file), "--out", str(tmp_path),
                 "--device", "cpu", "--steps", "1", "--eval-prompts", "0", "--draft-vocab", "300", *extra])
    assert code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("content, message", [(None, "neither a file"), ("", "holds no text"),
                                              ("{not json", "not JSON")])
def test_missing_or_empty_data_gets_a_clear_error(target_dir, tmp_path, capsys, content, message):
    data = tmp_path / "data.jsonl"
    if content is not None:
        data.write_text(content)
    code = main(["distill", "--target", str(target_dir), "--data", str(data), "--out", str(tmp_path / "o"),
                 "--device", "cpu"])
    assert code == 2
    assert message in capsys.readouterr().err


def test_a_bfloat16_target_distils_on_cpu(target_dir, data_file, tmp_path):
    # half-precision targets train under autocast with float32 master weights
    assert main(["distill", "--target", str(target_dir), "--data", str(data_file), "--out", str(tmp_path),
                 "--layers", "1", "--draft-vocab", "300", "--steps", "3", "--seq-len", "32", "--device", "cpu",
                 "--dtype", "bfloat16", "--eval-prompts", "0"]) == 0
    assert (tmp_path / "model.safetensors").exists()


def test_initial_layers_take_the_first_and_the_last():
    assert initial_layers(18, 1) == [0]
    assert initial_layers(18, 2) == [0, 17]
    assert initial_layers(18, 4) == [0, 1, 2, 17]
    with pytest.raises(ValueError):
        initial_layers(3, 4)
