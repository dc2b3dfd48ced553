"""The README's main job (vipllava-demo): mark, ask, answer, and agree with transformers."""

import re

import PIL.Image
import pytest

from vipllava_jax.commands.demo import DEMO_IMAGE, main


def test_demo_marks_the_bundled_scene_answers_and_matches_transformers(capsys, tmp_path):
    marked = tmp_path / "marked.png"
    assert main(["--save-marked", str(marked)]) == 0
    out = capsys.readouterr().out
    answer = re.search(r"^answer: (\w+)$", out, re.M).group(1)  # one word of the task's vocabulary
    assert answer == "white", out  # DEMO_BOX marks the middle object, a white square
    assert f"transformers' PyTorch generate: {answer} (same)" in out
    diff = float(re.search(r"transformers' PyTorch logits\| = (\S+)", out).group(1))
    assert diff <= 1e-4
    image = PIL.Image.open(marked).convert("RGB")
    original = PIL.Image.open(DEMO_IMAGE).convert("RGB")
    assert image.size == original.size
    assert image.getpixel((17, 23)) != original.getpixel((17, 23))  # the rectangle's left edge
    assert image.getpixel((5, 5)) == original.getpixel((5, 5))


def test_demo_takes_the_users_image_box_marker_and_question(capsys, tmp_path):
    # the bundled scene, as the user's own file; the left object is a gray circle
    mine = tmp_path / "mine.png"
    PIL.Image.open(DEMO_IMAGE).save(mine)
    args = ["--image", str(mine), "--box", "0,18,13,31", "--marker", "ellipse", "--color", "lime",
            "--question", "What color is the marked object?", "--save-marked", str(tmp_path / "m.png"),
            "--no-compare"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert re.search(r"^answer: gray$", out, re.M), out
    assert (tmp_path / "m.png").is_file()


def test_demo_rejects_an_image_without_a_box_and_a_bad_marker(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["--image", str(DEMO_IMAGE)])
    assert e.value.code == 2
    assert main(["--marker", "star", "--no-compare", "--save-marked", str(tmp_path / "x.png")]) == 2
    assert "unknown marker 'star'" in capsys.readouterr().err


def test_demo_says_where_the_png_is_and_prints_the_box_as_given(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["--no-compare", "--max-new-tokens", "2"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert f"at 17,17,29,29) -> {tmp_path.resolve() / 'vipllava_demo_marked.png'}" in first
    assert main(["--no-compare", "--max-new-tokens", "2", "--image", str(DEMO_IMAGE),
                 "--box", "17,17,29.5,29"]) == 0
    assert "at 17,17,29.5,29) ->" in capsys.readouterr().out
