"""`vipllava-convert`: HF -> Orbax -> HF, checked against transformers' PyTorch VipLlava.

Every reference here is computed in the test by transformers itself (tiny random models, no
hub access); the full-size checks build the 7B / 13B models abstractly on both sides.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch
from flax import nnx

from tests.helpers import make_hf_model, make_inputs, save_hf_model, torch_forward
from vipllava_jax.checkpoint import MARKER, PARAMS_DIR
from vipllava_jax.convert.cli import main
from vipllava_jax.models.vipllava.modeling import VipLlavaForConditionalGeneration

SIDE_FILES = {
    "tokenizer_config.json": json.dumps({"model_max_length": 4096, "padding_side": "left"}),
    "special_tokens_map.json": json.dumps({"bos_token": "<s>", "pad_token": "<pad>"}),
    "preprocessor_config.json": json.dumps({"crop_size": {"height": 28, "width": 28}}),
}
ATOL = 1e-4


# -- helpers -----------------------------------------------------------------------------------

@nnx.jit
def _logits(model, input_ids, pixel_values, attention_mask):
    return model(input_ids, pixel_values, attention_mask).logits


def jax_logits(folder, inputs, **kw) -> np.ndarray:
    model = VipLlavaForConditionalGeneration.from_pretrained(folder, **kw)
    return np.asarray(_logits(model, inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"]))


def max_err(ours: np.ndarray, ref: np.ndarray, inputs) -> float:
    """Largest difference over the non-padding positions."""
    keep = inputs["attention_mask"].astype(bool)
    return float(np.abs(ours.astype(np.float32) - ref)[keep].max())


def add_side_files(folder: Path) -> Path:
    for name, text in SIDE_FILES.items():
        (folder / name).write_text(text)
    return folder


def convert(*args) -> int:
    return main([str(a) for a in args])


def bf16_rounded(model):
    """A copy of `model` whose weights are rounded to bfloat16 (kept in float32)."""
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for p in rounded.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    return rounded


def hf_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in model.state_dict().items()}


def load_transformers(folder):
    from transformers import VipLlavaForConditionalGeneration as HF

    model, info = HF.from_pretrained(folder, output_loading_info=True)
    return model.eval(), info


def assert_clean_load(info):
    assert not info["missing_keys"], info
    assert not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info
    assert not info.get("error_msgs"), info


# -- fixtures ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    """(transformers model, HF folder with side files, inputs, reference logits)."""
    model = make_hf_model(seed=1)
    src = add_side_files(save_hf_model(model, tmp_path_factory.mktemp("untied") / "hf"))
    inputs = make_inputs(model.config)
    return model, src, inputs, torch_forward(model, inputs)[0]


@pytest.fixture(scope="module")
def untied_orbax(untied, tmp_path_factory):
    """The untied checkpoint converted by the installed console script (a real subprocess)."""
    _, src, _, _ = untied
    dst = tmp_path_factory.mktemp("untied_orbax") / "orbax"
    exe = Path(sys.executable).with_name("vipllava-convert")
    assert exe.is_file(), f"console script not installed next to {sys.executable}"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([str(exe), "hf-to-orbax", str(src), str(dst)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {dst}" in proc.stdout
    return dst


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    model = make_hf_model(seed=2, tied=True)
    src = add_side_files(save_hf_model(model, tmp_path_factory.mktemp("tied") / "hf"))
    inputs = make_inputs(model.config, seed=1)
    return model, src, inputs, torch_forward(model, inputs)[0]


@pytest.fixture(scope="module")
def rounded_ref(untied):
    """Reference logits of the untied model with its weights rounded to bfloat16."""
    model, _, inputs, _ = untied
    rounded = bf16_rounded(model)
    return rounded, torch_forward(rounded, inputs)[0]


# -- HF -> Orbax ---------------------------------------------------------------------------------

def test_hf_to_orbax_matches_transformers(untied, untied_orbax):
    _, src, inputs, ref = untied
    assert (untied_orbax / MARKER).is_file() and (untied_orbax / PARAMS_DIR).is_dir()
    assert max_err(jax_logits(untied_orbax, inputs), ref, inputs) <= ATOL
    for name, text in SIDE_FILES.items():
        assert (untied_orbax / name).read_text() == text, name
    assert (untied_orbax / "generation_config.json").is_file()  # written by save_pretrained
    assert not list(untied_orbax.glob("*.safetensors")) and not list(untied_orbax.parent.glob(".*tmp-*"))


@pytest.mark.parametrize("layout, shards, old_config", [("v4_37", 3, True), ("v4_52", 1, False)])
def test_older_layouts_convert(untied, tmp_path, layout, shards, old_config):
    """The hub's transformers 4.37-4.51 layout (sharded, old config dialect) and 4.52-4.57's."""
    model, _, inputs, ref = untied
    src = save_hf_model(model, tmp_path / "hf", layout=layout, shards=shards, old_config=old_config)
    assert convert("hf-to-orbax", src, tmp_path / "orbax") == 0
    assert max_err(jax_logits(tmp_path / "orbax", inputs), ref, inputs) <= ATOL


def test_pytorch_bin_source(rounded_ref, untied, tmp_path):
    """pytorch_model.bin shards (torch.load weights_only), stored in bfloat16."""
    model, _, inputs, _ = untied
    _, ref = rounded_ref
    src = save_hf_model(model, tmp_path / "hf", fmt="bin", shards=2, dtype=torch.bfloat16)
    assert (src / "pytorch_model.bin.index.json").is_file()
    assert convert("hf-to-orbax", src, tmp_path / "orbax", "--dtype", "float32") == 0
    assert max_err(jax_logits(tmp_path / "orbax", inputs), ref, inputs) <= ATOL


def test_bfloat16_storage(untied, untied_orbax, rounded_ref, tmp_path):
    _, src, inputs, _ = untied
    rounded, ref = rounded_ref
    dst = tmp_path / "orbax_bf16"
    assert convert("hf-to-orbax", src, dst, "--dtype", "bfloat16") == 0
    meta = ocp.StandardCheckpointer().metadata((dst / PARAMS_DIR).absolute()).item_metadata.tree
    dtypes = {str(np.dtype(m.dtype)) for m in jax.tree.leaves(meta)}
    assert dtypes == {"bfloat16"}
    assert json.loads((dst / "config.json").read_text())["dtype"] == "bfloat16"
    # About half the bytes of the float32 conversion (Orbax compresses, so not exactly).
    size = lambda d: sum(f.stat().st_size for f in (d / PARAMS_DIR).rglob("*") if f.is_file())  # noqa: E731
    assert size(dst) < 0.7 * size(untied_orbax)

    # Restored as float32 the values are exactly the rounded weights.
    assert max_err(jax_logits(dst, inputs), ref, inputs) <= ATOL
    model = VipLlavaForConditionalGeneration.from_pretrained(dst, param_dtype="bfloat16")
    assert {str(p.dtype) for p in jax.tree.leaves(nnx.state(model, nnx.Param))} == {"bfloat16"}

    # Back to HF: bfloat16 safetensors holding exactly the rounded weights.
    back = tmp_path / "hf_bf16"
    assert convert("orbax-to-hf", dst, back) == 0
    loaded, info = load_transformers(back)
    assert_clean_load(info)
    want = hf_state(rounded)
    for k, v in hf_state(loaded).items():
        assert torch.equal(v.float(), want[k]), k


# -- Orbax -> HF ---------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["untied", "tied", "sharded"])
def test_round_trip(case, untied, untied_orbax, tied, tmp_path):
    """HF -> Orbax -> HF loads into transformers with no missing/unexpected keys, same logits."""
    model, src, inputs, ref = tied if case == "tied" else untied
    if case == "tied":  # no head of its own, in Orbax nor back in HF
        orbax = tmp_path / "orbax"
        assert convert("hf-to-orbax", src, orbax) == 0
        assert VipLlavaForConditionalGeneration.from_pretrained(orbax).lm_head is None
    else:
        orbax = untied_orbax
    back = tmp_path / "hf_back"
    extra = ["--max-shard-size", "0.0001"] if case == "sharded" else []  # ~100 KiB shards
    assert convert("orbax-to-hf", orbax, back, *extra) == 0

    shards = sorted(back.glob("model*.safetensors"))
    if case == "sharded":
        index = json.loads((back / "model.safetensors.index.json").read_text())
        assert len(shards) > 2
        assert set(index["weight_map"].values()) == {f.name for f in shards}
        assert index["metadata"]["total_size"] == sum(v.numel() * 4 for v in model.state_dict().values())
    else:
        assert [f.name for f in shards] == ["model.safetensors"]
        assert not (back / "model.safetensors.index.json").exists()
    for name, text in SIDE_FILES.items():
        assert (back / name).read_text() == text, name
    stored = {k for f in shards for k in _header(f)}
    assert ("language_model.lm_head.weight" in stored) == (case != "tied")
    assert all(k.startswith(("language_model.", "vision_tower.", "multi_modal_projector.")) for k in stored)

    loaded, info = load_transformers(back)
    assert_clean_load(info)
    assert loaded.config.tie_word_embeddings == (case == "tied")
    original = hf_state(model)
    restored = hf_state(loaded)
    assert set(restored) == set(original)
    for k, v in original.items():
        assert torch.equal(restored[k], v), k
    logits, _ = torch_forward(loaded, inputs)
    np.testing.assert_array_equal(logits, ref)


# -- bad input -----------------------------------------------------------------------------------

def _rewrite_safetensors(folder: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    file = folder / "model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def _header(file: Path) -> dict:
    data = file.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    header.pop("__metadata__", None)
    return header


def _last_tensor(file: Path) -> str:
    header = _header(file)
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
