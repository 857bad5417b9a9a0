"""Named models: assembled once from their parts, checked, never left half-written."""
from __future__ import annotations

import hashlib
import subprocess
import sys

import pytest

from specdec.errors import ModelLoadError
from specdec.loading.assembly import Part, assemble, is_assembled
from specdec.loading.registry import REGISTRY


def _parts(tmp_path, contents: list[bytes], recorded: list[bytes] | None = None) -> list[Part]:
    parts = []
    for i, (data, expected) in enumerate(zip(contents, recorded or contents), start=1):
        path = tmp_path / f"part{i}.bin"
        path.write_bytes(data)
        parts.append(Part(f"fake-part{i}", (lambda p=path: p), len(expected), hashlib.sha256(expected).hexdigest()))
    return parts


def test_parts_are_concatenated_in_order_and_recorded(tmp_path):
    contents = [b"GGUF" + bytes(range(200)) * 50, b"second" * 1000, b"third"]
    destination = tmp_path / "cache" / "model.gguf"
    assert assemble(destination, _parts(tmp_path, contents), "hint") == destination
    assert destination.read_bytes() == b"".join(contents)
    assert is_assembled(destination, _parts(tmp_path, contents))
    stamp = destination.stat().st_mtime_ns
    assemble(destination, _parts(tmp_path, contents), "hint")  # already there: not rewritten
    assert destination.stat().st_mtime_ns == stamp


@pytest.mark.parametrize("damage", ["bytes", "size"])
def test_a_damaged_part_is_named_and_nothing_is_left_behind(tmp_path, damage):
    good = [b"GGUF" + b"a" * 100, b"b" * 100, b"c" * 100]
    bad = list(good)
    bad[1] = b"B" * 100 if damage == "bytes" else b"b" * 99
    destination = tmp_path / "cache" / "model.gguf"
    with pytest.raises(ModelLoadError, match=r"part 2 of 3 \(fake-part2.*pip install --force-reinstall"):
        assemble(destination, _parts(tmp_path, bad, recorded=good), "hint")
    assert list(destination.parent.iterdir()) == []


def test_a_missing_part_package_says_how_to_install_it(tmp_path):
    def missing():
        raise ImportError("no module")

    parts = _parts(tmp_path, [b"GGUF"]) + [Part("fake-part2", missing, 1, "0" * 64)]
    with pytest.raises(ModelLoadError, match="'fake-part2' is not installed; pip install it"):
        assemble(tmp_path / "m.gguf", parts, "pip install it")


def test_models_command_lists_the_registry_with_presence():
    out = subprocess.run([sys.executable, "-m", "specdec.cli", "models"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for name in REGISTRY:
        assert name in out.stdout
    assert "gemma-3-270m (default)" in out.stdout and "present" in out.stdout
