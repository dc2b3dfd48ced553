"""The README's main job (vipllava-demo) runs end to end and agrees with transformers."""

import re

from vipllava_jax.demo import main


def test_demo_command_matches_transformers(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "-> logits (1, 25, 256)" in out
    diff = float(re.search(r"transformers' PyTorch logits\| = (\S+)", out).group(1))
    assert diff <= 1e-4
