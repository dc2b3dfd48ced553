"""The README's main job (vipllava-demo) runs end to end and agrees with transformers."""

from vipllava_jax.demo import TINY, main, run


def test_demo_pipeline_matches_transformers(tmp_path):
    result = run(tmp_path)
    assert result["logits"].shape == (1, result["ids"].shape[1], TINY.text_config.vocab_size)
    assert result["max_abs_diff"] <= 1e-4
    assert (result["orbax_dir"] / "params").is_dir()


def test_demo_command_prints_the_comparison(capsys):
    assert main([]) == 0
    assert "max |logits - transformers' PyTorch logits|" in capsys.readouterr().out
