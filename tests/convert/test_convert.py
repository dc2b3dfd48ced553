"""`vipllava-convert`: HF -> Orbax -> HF, checked against transformers' PyTorch VipLlava.

Every reference here is computed in the test by transformers itself (tiny random models, no
hub access); the full-size checks build the 7B / 13B models abstractly on both sides.
"""

from __future__ import annotations

import copy
import json
import os
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
from tests.helpers.convert import ATOL, SIDE_FILES, add_side_files, convert, jax_logits, max_err, safetensors_header
from vipllava_jax.checkpoint import MARKER, PARAMS_DIR
from vipllava_jax.models.vipllava.modeling import VipLlavaForConditionalGeneration

# -- helpers -----------------------------------------------------------------------------------

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
    stored = {k for f in shards for k in safetensors_header(f)}
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
