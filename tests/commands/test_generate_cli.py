"""vipllava-generate end to end: converted tiny model + tokenizer + image file -> answer text,
equal to transformers' greedy generate on the same inputs."""

import numpy as np
import PIL.Image
import pytest
import torch

from tests.helpers import IMAGE_TOKEN, make_hf_model, make_word_tokenizer
from vipllava_jax.commands.generate import main
from vipllava_jax.convert import hf_to_orbax
from vipllava_jax.errors import VipLlavaError
from vipllava_jax.processing.processor import VipLlavaProcessor
from vipllava_jax.processing.prompts import build_prompt

QUESTION = "What is inside the red rectangle ?"


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    hf = make_hf_model(seed=3)
    hf.save_pretrained(root / "hf")
    tokenizer = make_word_tokenizer(root / "hf", [build_prompt(QUESTION), "a cat on a chair"])
    assert tokenizer.convert_tokens_to_ids("<image>") == IMAGE_TOKEN
    hf_to_orbax(root / "hf", root / "orbax")
    image = root / "image.png"
    PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), np.uint8)).save(image)
    return hf, root, image


def reference_answer(hf, folder, image, max_new_tokens):
    processor = VipLlavaProcessor.from_pretrained(folder)
    inputs = processor(text=build_prompt(QUESTION), images=[str(image)])
    with torch.no_grad():
        out = hf.generate(
            input_ids=torch.tensor(inputs["input_ids"]), pixel_values=torch.tensor(inputs["pixel_values"]),
            attention_mask=torch.tensor(inputs["attention_mask"]), max_new_tokens=max_new_tokens,
            do_sample=False, eos_token_id=processor.tokenizer.eos_token_id,
            pad_token_id=processor.pad_token_id,
        )
    return processor.decode(out[0, inputs["input_ids"].shape[1]:].numpy())


@pytest.mark.parametrize("stream", [False, True])
def test_cli_answer_equals_transformers(converted, capsys, stream):
    hf, root, image = converted
    args = ["--model", str(root / "orbax"), "--image", str(image), "--prompt", QUESTION,
            "--max-new-tokens", "6"] + (["--stream"] if stream else [])
    assert main(args) == 0
    printed = capsys.readouterr().out.strip()
    assert printed and printed == reference_answer(hf, root / "hf", image, 6).strip()


def test_cli_bad_image_path_is_one_clear_line(converted, capsys):
    _, root, _ = converted
    assert main(["--model", str(root / "orbax"), "--image", "/nonexistent.png", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nonexistent.png" in err[0]


def test_cli_marker_draws_saves_and_answers(converted, capsys, tmp_path):
    """--marker/--box/--color draw on the image before asking; --save-marked writes exactly the
    image the model saw, and the answer equals transformers' on that marked image."""
    from vipllava_jax.processing.visual_prompts import VisualPrompt, draw_visual_prompt

    hf, root, image = converted
    saved = tmp_path / "marked.png"
    args = ["--model", str(root / "orbax"), "--image", str(image), "--prompt", QUESTION,
            "--max-new-tokens", "4", "--marker", "rectangle", "--box", "10,8,40,32",
            "--color", "lime", "--save-marked", str(saved)]
    assert main(args) == 0
    out = capsys.readouterr()
    assert "warning" not in out.err
    with PIL.Image.open(saved) as f:
        assert f.format == "PNG"
        marked = np.asarray(f.convert("RGB"))
    want = draw_visual_prompt(str(image), VisualPrompt(marker="rectangle", box=(10, 8, 40, 32),
                                                       color="lime"))
    np.testing.assert_array_equal(marked, np.asarray(want))
    assert not np.array_equal(marked, np.asarray(PIL.Image.open(image).convert("RGB")))
    assert out.out.strip() == reference_answer(hf, root / "hf", saved, 4).strip()


@pytest.mark.parametrize("pad", [False, True])
def test_cli_marker_cut_by_crop_warns_in_one_line(converted, capsys, monkeypatch, pad):
    """The warning comes before the model loads; loading is stubbed out (the run above covers
    generation) to keep the test fast."""
    from vipllava_jax.models.vipllava import modeling

    def stop(*a, **k):
        raise VipLlavaError("stopped before loading the model")

    monkeypatch.setattr(modeling.VipLlavaForConditionalGeneration, "from_pretrained", stop)
    _, root, image = converted
    args = ["--model", str(root / "orbax"), "--image", str(image), "--prompt", QUESTION,
            "--marker", "arrow", "--point", "2,20", "--marker-style", "random",
            "--color", "255,128,0"] + (["--pad-to-square"] if pad else [])
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith("stopped before loading the model")
    if pad:
        assert len(err) == 1
    else:
        assert len(err) == 2 and err[0].startswith("vipllava-generate: warning:")
        assert "arrow" in err[0] and "pad_to_square" in err[0]


@pytest.mark.parametrize("flags, message", [
    (["--box", "1,2,3,4"], "--box needs --marker"),
    (["--save-marked", "x.png"], "--save-marked needs --marker"),
    (["--color", "blue"], "--color needs --marker"),
    (["--marker", "rectangle"], "exactly one of --box"),
    (["--marker", "point", "--box", "1,2,3,4", "--point", "2,2"], "exactly one of --box"),
    (["--marker", "rectangle", "--box", "1,2,3"], "--box takes 4 comma-separated numbers"),
    (["--marker", "point", "--point", "a,b"], "--point takes 2"),
    (["--marker", "star", "--box", "1,2,3,4"], "unknown marker 'star'"),
    (["--marker", "rectangle", "--box", "1,2,3,4", "--color", "pink"], "unknown colour 'pink'"),
    (["--marker", "rectangle", "--box", "1,2,3,4", "--color", "1,2"], "--color takes 3"),
    (["--marker", "rectangle", "--box", "1,2,3,4", "--marker-style", "odd"], "style"),
    (["--marker", "rectangle", "--box", "10,10,60,30"], "not inside the 50x40 image"),
    (["--marker", "rectangle", "--box", "10,10,20,20", "--save-marked", "/nonexistent/m.png"],
     "nonexistent"),
])
def test_cli_bad_marker_flags_exit_2_in_one_line(converted, capsys, flags, message):
    _, root, image = converted
    args = ["--model", str(root / "orbax"), "--image", str(image), "--prompt", "hi", *flags]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vipllava-generate: error:") and message in err[0]


# -- the embedded model (the default --model): answers that stop at the chat turn's end -------

def test_default_model_answer_stops_at_the_turn_end(capsys, tmp_path):
    """Without --model the embedded tiny model answers; the answer ends where the template's
    turn ends ("###"), with no separator printed, streamed or not."""
    from vipllava_jax.commands.demo import DEMO_BOX, DEMO_IMAGE, DEMO_QUESTION

    box = ",".join(map(str, DEMO_BOX))
    base = ["--image", str(DEMO_IMAGE), "--question", DEMO_QUESTION, "--marker", "rectangle",
            "--box", box, "--max-new-tokens", "12"]
    for extra in ([], ["--stream"], ["--temperature", "0"]):
        assert main(base + extra) == 0
        out = capsys.readouterr().out.strip()
        assert out in ("white", "black", "gray") and "#" not in out, out


def test_temperature_zero_is_greedy(converted, capsys):
    _, root, image = converted
    args = ["--model", str(root / "orbax"), "--image", str(image), "--question", QUESTION,
            "--max-new-tokens", "5"]
    assert main(args) == 0
    greedy = capsys.readouterr().out
    assert main(args + ["--temperature", "0", "--seed", "7"]) == 0
    assert capsys.readouterr().out == greedy


@pytest.mark.parametrize("flags, message", [
    (["--temperature", "inf"], "--temperature must be a finite number >= 0"),
    (["--temperature", "-1"], "--temperature must be a finite number >= 0"),
    (["--top-k", "-3"], "--top-k must be >= 0"),
    (["--top-p", "0"], "--top-p must be in (0, 1]"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
])
def test_bad_sampling_flags_are_one_line_errors(capsys, flags, message):
    assert main(["--image", "x.png", "--question", "hi"] + flags) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_hf_folder_without_tokenizer_is_one_line_error(tmp_path, capsys):
    hf = make_hf_model(seed=3)
    hf.save_pretrained(tmp_path / "hf")
    image = tmp_path / "image.png"
    PIL.Image.new("RGB", (20, 20)).save(image)
    capsys.readouterr()
    assert main(["--model", str(tmp_path / "hf"), "--image", str(image), "--question", "hi"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has no tokenizer" in err[0]


def test_box_on_an_exif_rotated_photo_is_in_upright_coordinates(tmp_path, capsys):
    """A phone JPEG (Orientation=6): the marked image is upright and the box marks the pixels
    the user meant."""
    from tests.helpers.images import phone_jpeg

    photo = phone_jpeg(tmp_path / "phone.jpg")
    saved = tmp_path / "marked.png"
    assert main(["--image", str(photo), "--question", "What color is the marked object?",
                 "--marker", "rectangle", "--box", "35,5,55,30", "--save-marked", str(saved),
                 "--max-new-tokens", "2"]) == 0
    with PIL.Image.open(saved) as f:
        marked = np.asarray(f.convert("RGB"), np.int16)
    assert marked.shape == (40, 60, 3)
    r, g, b = marked[5, 45]  # the box's top edge, over the white half
    assert r > 200 and r - g > 60 and r - b > 60


@pytest.mark.parametrize("module", ["vipllava_jax.commands.generate", "vipllava_jax.evaluation.cli",
                                    "vipllava_jax.commands.demo", "vipllava_jax.convert.cli",
                                    "vipllava_jax.train.cli"])
def test_help_does_not_import_jax(module):
    import subprocess
    import sys

    code = (f"import sys\nfrom {module} import main\ntry:\n    main(['--help'])\n"
            "except SystemExit:\n    pass\nprint('JAX' if 'jax' in sys.modules else 'NOJAX')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().endswith("NOJAX"), out.stdout[-300:] + out.stderr[-300:]
