"""`vipllava-convert` on bad input: a missing, unexpected, mis-shaped or doubly stored weight,
truncated or corrupt files, invalid safetensors offsets, wrong configs, an existing
destination. Each is one error line, exit status 2, and nothing left behind."""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch

from tests.helpers.convert import ATOL, convert, jax_logits, max_err, safetensors_header
from vipllava_jax.checkpoint import MARKER

# -- bad input -----------------------------------------------------------------------------------

def _rewrite_safetensors(folder: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    file = folder / "model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def _last_tensor(file: Path) -> str:
    header = safetensors_header(file)
    return max(header, key=lambda k: header[k]["data_offsets"][1])


def _edit_config(folder: Path, edit) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    edit(cfg)
    (folder / "config.json").write_text(json.dumps(cfg))


def _truncate(folder: Path) -> list[str]:
    file = folder / "model.safetensors"
    last = _last_tensor(file)
    data = file.read_bytes()
    file.write_bytes(data[:-100])
    return ["truncated", last]


def _corrupt_header(folder: Path) -> list[str]:
    file = folder / "model.safetensors"
    data = bytearray(file.read_bytes())
    data[8:24] = b"\xff" * 16
    file.write_bytes(bytes(data))
    return ["corrupt safetensors header", "model.safetensors"]


def _bad_header_length(folder: Path) -> list[str]:
    file = folder / "model.safetensors"
    data = bytearray(file.read_bytes())
    data[:8] = struct.pack("<Q", 2**40)
    file.write_bytes(bytes(data))
    return ["truncated safetensors file", "model.safetensors"]


def _missing(folder: Path) -> list[str]:
    key = "language_model.model.layers.1.mlp.down_proj.weight"
    _rewrite_safetensors(folder, lambda t: t.pop(key))
    return ["missing weight", key]


def _unexpected(folder: Path) -> list[str]:
    key = "language_model.model.layers.0.mlp.extra_proj.weight"
    _rewrite_safetensors(folder, lambda t: t.__setitem__(key, torch.zeros(2, 2)))
    return ["unexpected weight", key]


def _shape_mismatch(folder: Path) -> list[str]:
    key = "multi_modal_projector.linear_1.weight"
    _rewrite_safetensors(folder, lambda t: t.__setitem__(key, t[key][:, :-1].contiguous()))
    return ["shape mismatch", key]


def _stored_twice(folder: Path) -> list[str]:
    key = "vision_tower.vision_model.pre_layrnorm.weight"  # 4.37 spelling of vision_tower.pre_layrnorm.weight
    _rewrite_safetensors(folder, lambda t: t.__setitem__(key, t["vision_tower.pre_layrnorm.weight"].clone()))
    return ["stored twice", "pre_layrnorm.weight"]


def _other_model_type(folder: Path) -> list[str]:
    _edit_config(folder, lambda c: c.__setitem__("model_type", "llava"))
    return ["model_type 'llava'"]


def _other_text_model(folder: Path) -> list[str]:
    _edit_config(folder, lambda c: c["text_config"].__setitem__("model_type", "gemma"))
    return ["text_config model_type 'gemma'"]


def _no_config(folder: Path) -> list[str]:
    (folder / "config.json").unlink()
    return ["no config.json"]


def _config_not_json(folder: Path) -> list[str]:
    (folder / "config.json").write_text('{"model_type": "vipllava",')
    return ["config.json", "not valid JSON"]


def _no_weights(folder: Path) -> list[str]:
    (folder / "model.safetensors").unlink()
    return ["no weights"]


def _missing_shard(folder: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(folder / "model.safetensors", "pt") as f:
        keys = list(f.keys())
    weight_map = dict.fromkeys(keys, "model.safetensors")
    weight_map[keys[0]] = "model-00002-of-00002.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return ["model-00002-of-00002.safetensors", "missing"]


def _truncated_bin(folder: Path) -> list[str]:
    from safetensors.torch import load_file

    tensors = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(tensors, folder / "pytorch_model.bin")
    data = (folder / "pytorch_model.bin").read_bytes()
    (folder / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    return ["pytorch_model.bin", "cannot read PyTorch checkpoint"]


def _header_not_object(folder: Path) -> list[str]:
    blob = b"[1, 2]  "
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(blob)) + blob)
    return ["corrupt safetensors header"]


def _bin_with_object(folder: Path) -> list[str]:
    """A pickle that weights_only refuses (torch's own message spans several lines)."""
    import fractions

    (folder / "model.safetensors").unlink()
    torch.save({"multi_modal_projector.linear_1.weight": fractions.Fraction(1, 3)}, folder / "pytorch_model.bin")
    return ["pytorch_model.bin", "fractions.Fraction"]


def _bin_with_non_tensor(folder: Path) -> list[str]:
    from safetensors.torch import load_file

    tensors = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save({**tensors, "step": 3}, folder / "pytorch_model.bin")
    return ["pytorch_model.bin", "step is not a tensor"]


def _set_offsets(folder: Path, edit) -> None:
    """Rewrites the header of model.safetensors with `edit(header)` applied (same data)."""
    file = folder / "model.safetensors"
    data = file.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    edit(header)
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    file.write_bytes(struct.pack("<Q", len(blob)) + blob + data[8 + n:])


def _tensor_at(header: dict, rank: int) -> str:
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    return names[rank]


def _negative_offset(folder: Path) -> list[str]:
    def edit(h):
        e = h[_tensor_at(h, 0)]
        size = e["data_offsets"][1] - e["data_offsets"][0]
        e["data_offsets"] = [-size, 0]
    _set_offsets(folder, edit)
    return ["corrupt header entry", "offsets [-"]


def _huge_negative_offset(folder: Path) -> list[str]:
    _set_offsets(folder, lambda h: h[_tensor_at(h, 0)].__setitem__("data_offsets", [-10**9, -10**9 + 4]))
    return ["corrupt header entry"]


def _overlapping_offsets(folder: Path) -> list[str]:
    def edit(h):  # the second tensor reads the first one's bytes
        first, second = h[_tensor_at(h, 0)], h[_tensor_at(h, 1)]
        second.update(dtype=first["dtype"], shape=first["shape"], data_offsets=first["data_offsets"])
    _set_offsets(folder, edit)
    return ["corrupt tensor offsets", "overlaps"]


def _gap_in_offsets(folder: Path) -> list[str]:
    def edit(h):  # the first tensor starts later: a hole before it, and it overlaps the next
        e = h[_tensor_at(h, 0)]
        e["data_offsets"] = [e["data_offsets"][0] + 8, e["data_offsets"][1] + 8]
    _set_offsets(folder, edit)
    return ["corrupt tensor offsets", "gap of 8 bytes"]


def _trailing_bytes(folder: Path) -> list[str]:
    with open(folder / "model.safetensors", "ab") as f:
        f.write(b"\0" * 64)
    return ["64 bytes after the last tensor"]


def _weight_map_list(folder: Path) -> list[str]:
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["model.safetensors"]}))
    return ["not a valid weight index", "got a list"]


BAD_INPUTS = {f.__name__.lstrip("_"): f for f in (
    _missing, _unexpected, _shape_mismatch, _stored_twice, _truncate, _corrupt_header,
    _bad_header_length, _header_not_object, _other_model_type, _other_text_model, _no_config,
    _config_not_json, _no_weights, _missing_shard, _truncated_bin, _bin_with_object,
    _bin_with_non_tensor, _negative_offset, _huge_negative_offset, _overlapping_offsets,
    _gap_in_offsets, _trailing_bytes, _weight_map_list,
)}


def _leftovers(parent: Path, name: str) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")]


def _assert_one_error_line(capsys, *needles) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("vipllava-convert: error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_fails_cleanly(case, untied, tmp_path, capsys):
    src = tmp_path / "hf"
    shutil.copytree(untied[1], src)
    needles = BAD_INPUTS[case](src)
    out = tmp_path / "out"
    out.mkdir()
    capsys.readouterr()
    assert convert("hf-to-orbax", src, out / "orbax") == 2
    _assert_one_error_line(capsys, *needles)
    assert not (out / "orbax").exists()
    assert os.listdir(out) == []  # no temporary sibling left behind


def test_existing_destination(untied, tmp_path, capsys):
    _, src, inputs, ref = untied
    dst = tmp_path / "orbax"
    dst.mkdir()
    (dst / "keep.txt").write_text("old")
    capsys.readouterr()

    assert convert("hf-to-orbax", src, dst) == 2
    _assert_one_error_line(capsys, "already exists", str(dst), "--overwrite")
    assert os.listdir(dst) == ["keep.txt"] and (dst / "keep.txt").read_text() == "old"

    # --overwrite with a broken source leaves the old folder as it was.
    broken = tmp_path / "broken"
    shutil.copytree(src, broken)
    _missing(broken)
    assert convert("hf-to-orbax", broken, dst, "--overwrite") == 2
    _assert_one_error_line(capsys, "missing weight")
    assert os.listdir(dst) == ["keep.txt"]
    assert sorted(os.listdir(tmp_path)) == ["broken", "orbax"]

    assert convert("hf-to-orbax", src, dst, "--overwrite") == 0
    assert not (dst / "keep.txt").exists() and (dst / MARKER).is_file()
    assert sorted(os.listdir(tmp_path)) == ["broken", "orbax"]
    assert max_err(jax_logits(dst, inputs), ref, inputs) <= ATOL

    # orbax-to-hf refuses an existing destination too, and a source that is not an Orbax folder.
    capsys.readouterr()
    assert convert("orbax-to-hf", dst, broken) == 2
    _assert_one_error_line(capsys, "already exists")
    assert convert("orbax-to-hf", src, tmp_path / "back") == 2
    _assert_one_error_line(capsys, "not a vipllava-jax Orbax folder")
    assert sorted(os.listdir(tmp_path)) == ["broken", "orbax"]

    # A destination whose parent is a file: one line, nothing written.
    (tmp_path / "file").write_text("x")
    capsys.readouterr()
    assert convert("orbax-to-hf", dst, tmp_path / "file" / "back") == 2
    _assert_one_error_line(capsys, "Not a directory")
    # A file as destination is replaced with --overwrite, leaving no sibling behind.
    assert convert("orbax-to-hf", dst, tmp_path / "file", "--overwrite") == 0
    assert (tmp_path / "file" / "model.safetensors").is_file()
    assert sorted(os.listdir(tmp_path)) == ["broken", "file", "orbax"]
