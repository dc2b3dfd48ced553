"""`vipllava-convert` on vision-encoder-decoder folders: HF -> Orbax -> HF, and bad inputs.

The round trip must give a folder that transformers' VisionEncoderDecoderModel loads with no
missing or unexpected weight and the same logits as the model it started from.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from safetensors.torch import load_file, save_file

from tests.helpers.ved import ATOL, caption_labels, images, torch_out
from vipllava_jax.checkpoint import MARKER
from vipllava_jax.convert.cli import main
from vipllava_jax.models.ved import VisionEncoderDecoderModel


def convert(*args) -> int:
    return main([str(a) for a in args])


# tied GPT-2; untied BERT + projection; untied TrOCR reading the encoder's width; tied RoBERTa;
# untied pre-norm mBART; BEiT with per-layer bias tables and layer scale; BEiT with a shared
# table, absolute positions and a mask token; Swin with patch merging (and absolute positions)
@pytest.mark.parametrize("name", ["vit_gpt2", "vit_bert_proj", "deit_trocr", "vit_roberta", "deit_mbart",
                                  "beit_trocr", "beit_gpt2_shared", "swin_mbart", "swin_bert_abs"])
def test_round_trip_loads_in_transformers(hf_veds, tmp_path, name):
    from transformers import VisionEncoderDecoderModel as HF

    hf, src = hf_veds(name)
    (src / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64}))
    assert convert("hf-to-orbax", src, tmp_path / "orbax") == 0
    assert (tmp_path / "orbax" / MARKER).is_file()
    assert (tmp_path / "orbax" / "tokenizer_config.json").is_file()  # side files travel along
    assert convert("orbax-to-hf", tmp_path / "orbax", tmp_path / "hf") == 0

    back, info = HF.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    px, labels = images(), caption_labels()
    ref = torch_out(hf, pixel_values=px, labels=labels).logits.numpy()
    assert np.abs(torch_out(back.eval(), pixel_values=px, labels=labels).logits.numpy() - ref).max() == 0
    ours = VisionEncoderDecoderModel.from_pretrained(tmp_path / "orbax")(px, labels=labels)
    assert np.abs(np.asarray(ours.logits) - ref).max() <= ATOL


def test_bfloat16_conversion(hf_veds, tmp_path):
    _, src = hf_veds("vit_gpt2")
    assert convert("hf-to-orbax", src, tmp_path / "bf16", "--dtype", "bfloat16") == 0
    model = VisionEncoderDecoderModel.from_pretrained(tmp_path / "bf16", dtype="bfloat16")
    assert model.decoder.transformer.wte.embedding[...].dtype == np.dtype("bfloat16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"


def _broken_copy(src, dst, edit):
    """A copy of an HF folder whose weights `edit(state)` changed."""
    shutil.copytree(src, dst)
    state = load_file(dst / "model.safetensors")
    edit(state)
    save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


BAD = {
    "missing": (lambda s: s.pop("decoder.transformer.h.1.crossattention.q_attn.weight"),
                "missing weight decoder.transformer.h.1.crossattention.q_attn.weight"),
    "unexpected": (lambda s: s.update({"decoder.transformer.h.0.extra.weight": s["encoder.layernorm.weight"].clone()}),
                   "unexpected weight decoder.transformer.h.0.extra.weight"),
    "shape": (lambda s: s.update({"encoder.embeddings.position_embeddings":
                                  s["encoder.embeddings.position_embeddings"][:, :-1]}),
              "shape mismatch for encoder.embeddings.position_embeddings"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_checkpoint_fails_with_one_line_and_writes_nothing(hf_veds, tmp_path, capsys, case):
    edit, message = BAD[case]
    _, src = hf_veds("vit_gpt2")
    bad = _broken_copy(src, tmp_path / "bad", edit)
    capsys.readouterr()  # drop what building the fixture printed
    assert convert("hf-to-orbax", bad, tmp_path / "out") == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]  # no output, no temporary folder


def test_buffers_of_older_writers_are_ignored(hf_veds, tmp_path):
    """transformers 4.x GPT-2 files carry the causal-mask buffer `attn.bias`; it is skipped."""
    import torch

    _, src = hf_veds("vit_gpt2")
    old = _broken_copy(src, tmp_path / "old", lambda s: s.update(
        {"decoder.transformer.h.0.attn.bias": torch.ones(1, 1, 64, 64),
         "decoder.transformer.h.0.attn.masked_bias": torch.tensor(-1e4)}))
    assert convert("hf-to-orbax", old, tmp_path / "out") == 0
