"""`vipllava-convert ... --check`: transformers' PyTorch model on the source against ours on the
converted folder, for each family's test checkpoint; a corrupted conversion fails it."""

from __future__ import annotations

import numpy as np
import orbax.checkpoint as ocp

from vipllava_jax.checkpoint import PARAMS_DIR, flatten, nest
from vipllava_jax.convert.cli import main


def run(*args) -> int:
    return main([str(a) for a in args])


def test_check_passes_for_every_family(tiny_hf, hf_veds, original, tmp_path, capsys):
    _, vipllava = tiny_hf
    _, ved = hf_veds("vit_bert_proj")
    _, orig = original
    for name, src in (("vipllava", vipllava), ("ved", ved), ("original", orig)):
        assert run("hf-to-orbax", src, tmp_path / name, "--check") == 0, capsys.readouterr()
        out = capsys.readouterr().out
        assert "check ok" in out and "greedy tokens agree" in out, out


def test_check_fails_on_a_corrupted_conversion(tiny_hf, tmp_path, capsys, monkeypatch):
    """A converter that scaled one projection on its way would pass every shape check; the
    check catches it and exits 1."""
    from vipllava_jax.checkpoint import write_orbax_folder as real_write
    from vipllava_jax.convert import conversions

    def corrupted(tmp, params, config, dtype):
        key = next(k for k in params if k.endswith("self_attn.q_proj.kernel"))
        params = {**params, key: params[key] * 1.5}
        real_write(tmp, params, config, dtype)

    monkeypatch.setattr(conversions, "write_orbax_folder", corrupted)
    _, src = tiny_hf
    assert run("hf-to-orbax", src, tmp_path / "bad", "--check") == 1
    out = capsys.readouterr().out
    assert "check FAILED: max |Δlogits|" in out, out
    # the folder was written (the check judges it, it does not hide it)
    stored = flatten(ocp.StandardCheckpointer().metadata((tmp_path / "bad" / PARAMS_DIR).absolute()).item_metadata.tree)
    assert stored and nest({k: np.zeros(()) for k in stored})
