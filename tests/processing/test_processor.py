"""VipLlavaProcessor against transformers' LlavaProcessor (PIL CLIP backend), and the prompt
builder against the formats the model card and the original repository use. A word-level tokenizer is built locally (no hub)."""

from __future__ import annotations

import json
import warnings

import numpy as np
import PIL.Image
import pytest

from vipllava_jax.errors import ConfigError, VipLlavaError
from vipllava_jax.models.vipllava.config import VipLlavaConfig
from vipllava_jax.processing.processor import CLIPImagePreprocessor, VipLlavaProcessor
from vipllava_jax.processing.prompts import build_prompt
from vipllava_jax.processing.visual_prompts import VisualPrompt, VisualPromptError, draw_visual_prompts

IMAGE_SIZE = 42  # patch 14 -> 3 x 3 = 9 image tokens
PATCH = 14
NUM_IMAGE_TOKENS = 9
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
VIPLLAVA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. The assistant "
    "gives helpful, detailed, and polite answers to the human's questions."
)
LLAVA_V1_SYSTEM = (  # the original's conv_llava_v1 (its vicuna_v1 says "user" / "user's")
    "A chat between a curious human and an artificial intelligence assistant. The assistant "
    "gives helpful, detailed, and polite answers to the human's questions."
)
QUESTIONS = [
    "What is inside the red rectangle?",
    "Describe the object pointed at by the green arrow in detail, please.",
    "Is the dog near the blue ellipse?",
]
ANSWERS = ["A cat sitting on a chair.", "A small brown dog."]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A word-level tokenizer (bos `<s>` prepended like Llama), saved as transformers does."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    corpus = [VIPLLAVA_SYSTEM, LLAVA_V1_SYSTEM, "###Human: ###Assistant: USER: ASSISTANT:"]
    trainer = trainers.WordLevelTrainer(special_tokens=SPECIALS)
    tok.train_from_iterator(corpus + QUESTIONS + ANSWERS, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", SPECIALS.index("<s>"))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        pad_token="<pad>",
    )
    path = tmp_path_factory.mktemp("tokenizer")
    fast.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Random RGB images of different aspect ratios: as PIL, as HWC uint8 arrays and as files."""
    rng = np.random.default_rng(0)
    shapes = [(50, 67, 3), (73, 45, 3), (42, 42, 3)]
    arrays = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in shapes]
    pils = [PIL.Image.fromarray(a) for a in arrays]
    folder = tmp_path_factory.mktemp("images")
    paths = []
    for i, im in enumerate(pils):
        paths.append(str(folder / f"{i}.png"))
        im.save(paths[-1])
    return {"pil": pils, "np": arrays, "path": paths}


def hf_processor(tokenizer_dir, strategy="default", extra=1):
    from transformers import AutoTokenizer, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.padding_side = "left"
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    # LlavaProcessor: (H // patch) * (W // patch) + num_additional_image_tokens, minus 1 (the
    # CLS feature) when vision_feature_select_strategy == "default" -> 9 + 1 - 1.
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH,
        vision_feature_select_strategy=strategy, num_additional_image_tokens=extra,
    )


@pytest.fixture(scope="module")
def hf(tokenizer_dir):
    return hf_processor(tokenizer_dir)


@pytest.fixture(scope="module")
def ours(tokenizer_dir):
    return VipLlavaProcessor(
        tokenizer_dir, image_size=IMAGE_SIZE, num_image_tokens=NUM_IMAGE_TOKENS
    )


def assert_same(ours_out, hf_out):
    assert set(ours_out) == set(hf_out) & {"input_ids", "attention_mask", "pixel_values"}
    for key in ("input_ids", "attention_mask"):
        if key in ours_out:
            assert ours_out[key].dtype == np.int64
            np.testing.assert_array_equal(ours_out[key], np.asarray(hf_out[key]))
    if "pixel_values" in ours_out:
        assert ours_out["pixel_values"].dtype == np.float32
        np.testing.assert_allclose(
            ours_out["pixel_values"], np.asarray(hf_out["pixel_values"]), rtol=0, atol=1e-6
        )


def test_single_prompt_matches_llava_processor(ours, hf, images):
    prompt = build_prompt(QUESTIONS[0])
    out = ours(prompt, images["pil"][0])
    assert_same(out, hf(text=prompt, images=images["pil"][0], return_tensors="np"))
    assert out["input_ids"].shape[0] == 1 and out["input_ids"][0, 0] == SPECIALS.index("<s>")
    assert (out["input_ids"] == ours.image_token_id).sum() == NUM_IMAGE_TOKENS
    assert out["pixel_values"].shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert out["attention_mask"].all()


@pytest.mark.parametrize("kind", ["pil", "np", "path"])
def test_batch_left_padded_matches_llava_processor(ours, hf, images, kind):
    prompts = [
        build_prompt(QUESTIONS[0]),
        build_prompt([(QUESTIONS[1], ANSWERS[0]), (QUESTIONS[2], None)]),
    ]
    out = ours(prompts, images[kind][:2])
    assert_same(out, hf(text=prompts, images=images["pil"][:2], padding=True, return_tensors="np"))
    mask = out["attention_mask"]
    assert mask[0, 0] == 0 and mask[1].all()  # the shorter prompt is padded on the left
    assert (out["input_ids"][0][mask[0] == 0] == ours.pad_token_id).all()
    assert mask[0, -1] == 1


def test_image_kinds_give_identical_pixels(ours, images):
    pil, arr, path = (ours(images=images[k])["pixel_values"] for k in ("pil", "np", "path"))
    np.testing.assert_array_equal(pil, arr)
    np.testing.assert_array_equal(pil, path)
    assert pil.shape == (3, 3, IMAGE_SIZE, IMAGE_SIZE)


def test_rgba_and_grayscale_match_llava_processor(ours, hf, images):
    rng = np.random.default_rng(1)
    rgba = PIL.Image.fromarray(rng.integers(0, 256, (40, 55, 4), dtype=np.uint8))
    gray = PIL.Image.fromarray(rng.integers(0, 256, (61, 47), dtype=np.uint8))
    prompt = build_prompt([{"user": QUESTIONS[0], "image": 2}])
    expected = hf(text=prompt, images=[rgba, gray], return_tensors="np")
    assert_same(ours(prompt, [rgba, gray]), expected)


def test_full_strategy_gives_same_count(tokenizer_dir, ours, images):
    prompt = build_prompt(QUESTIONS[2])
    hf_full = hf_processor(tokenizer_dir, strategy="full", extra=0)
    expected = hf_full(text=prompt, images=images["pil"][1], return_tensors="np")
    assert_same(ours(prompt, images["np"][1]), expected)


def test_text_only_and_images_only(ours, hf):
    out = ours(QUESTIONS[0])
    assert set(out) == {"input_ids", "attention_mask"}
    assert_same(out, hf(text=QUESTIONS[0], return_tensors="np"))
    with pytest.raises(VipLlavaError, match="pass text, images or both"):
        ours()


def test_placeholder_count_mismatch_names_both_counts(ours, images):
    two = build_prompt([{"user": QUESTIONS[0], "image": 2}])
    with pytest.raises(ValueError, match=r"2 <image> placeholder\(s\) but 1 image\(s\)"):
        ours(two, images["pil"][0])
    with pytest.raises(ValueError, match=r"1 <image> placeholder\(s\) but 0 image\(s\)"):
        ours(build_prompt(QUESTIONS[0]))
    with pytest.raises(ValueError, match=r"0 <image> placeholder\(s\) but 1 image\(s\)"):
        ours(QUESTIONS[0], images["pil"][0])
    match = r"prompt 0 has 1 <image> placeholder\(s\) but 2 image\(s\)"
    with pytest.raises(ValueError, match=match):
        ours([build_prompt(QUESTIONS[0]), two], [images["pil"][:2], images["pil"][:1]])


def test_nested_images_per_prompt(ours, images):
    prompts = [build_prompt(QUESTIONS[0]), build_prompt([{"user": QUESTIONS[1], "image": 2}])]
    nested = ours(prompts, [images["pil"][:1], images["pil"][1:3]])
    flat = ours(prompts, images["pil"])
    for key in nested:
        np.testing.assert_array_equal(nested[key], flat[key])


def test_padding_options(ours):
    prompts = [QUESTIONS[0], QUESTIONS[1]]
    out = ours(prompts, pad_to_multiple_of=8)
    assert out["input_ids"].shape[1] % 8 == 0
    out = ours(prompts, padding="max_length", max_length=40, padding_side="right")
    assert out["input_ids"].shape == (2, 40) and out["attention_mask"][:, 0].all()
    with pytest.raises(VipLlavaError, match="more than max_length=4"):
        ours(prompts, padding="max_length", max_length=4)
    with pytest.raises(VipLlavaError, match="different lengths"):
        ours(prompts, padding=False)
    lists = ours(prompts, padding=False, return_tensors=None)
    assert [len(r) for r in lists["input_ids"]] == [sum(m) for m in lists["attention_mask"]]


def test_decode_delegates_to_tokenizer(ours):
    out = ours([QUESTIONS[0], QUESTIONS[2]])
    expected = ours.tokenizer.batch_decode(out["input_ids"].tolist(), skip_special_tokens=True)
    assert ours.batch_decode(out["input_ids"]) == expected
    assert ours.decode(out["input_ids"][1]) == expected[1]
    assert "<pad>" in ours.batch_decode(out["input_ids"], skip_special_tokens=False)[0]
    assert "What is inside the red rectangle" in expected[0]


def test_from_pretrained_llava_processor_folder(tmp_path, hf, ours, images):
    hf.save_pretrained(tmp_path)
    loaded = VipLlavaProcessor.from_pretrained(tmp_path)
    assert loaded.num_image_tokens == NUM_IMAGE_TOKENS
    assert loaded.image_processor == ours.image_processor
    prompts = [build_prompt(QUESTIONS[1]), build_prompt(QUESTIONS[0], template="llava_v1")]
    expected = hf(text=prompts, images=images["pil"][:2], padding=True, return_tensors="np")
    assert_same(loaded(prompts, images["path"][:2]), expected)


def test_from_pretrained_old_layout_and_model_config(tmp_path, tokenizer_dir, ours, images):
    """Old folders: preprocessor_config.json with int sizes; the model config.json wins."""
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "crop_size": IMAGE_SIZE,
        "size": IMAGE_SIZE, "resample": 3,
    }))
    with pytest.raises(ConfigError, match="how many tokens"):
        VipLlavaProcessor.from_pretrained(tmp_path)
    loaded = VipLlavaProcessor.from_pretrained(tmp_path, num_image_tokens=9)
    assert loaded.image_processor == ours.image_processor

    cfg = VipLlavaConfig.from_hf_dict({
        "model_type": "vipllava", "image_token_index": ours.image_token_id,
        "vision_config": {"image_size": IMAGE_SIZE, "patch_size": PATCH},
    })
    cfg.save_pretrained(tmp_path)
    # LlavaProcessor's rule would give 9 + 0 - 1 = 8 here: the model config wins, with a warning.
    (tmp_path / "processor_config.json").write_text(
        json.dumps({"patch_size": PATCH, "vision_feature_select_strategy": "default"})
    )
    with pytest.warns(UserWarning, match="gives 8 image tokens but the model takes 9"):
        loaded = VipLlavaProcessor.from_pretrained(tmp_path)
    assert loaded.num_image_tokens == cfg.num_image_tokens == NUM_IMAGE_TOKENS
    prompt = build_prompt(QUESTIONS[2])
    for key, value in ours(prompt, images["pil"][2]).items():
        np.testing.assert_array_equal(loaded(prompt, images["pil"][2])[key], value)

    for name in ("preprocessor_config.json", "processor_config.json"):
        (tmp_path / name).unlink()  # the image size from the model config alone
    assert VipLlavaProcessor.from_pretrained(tmp_path).image_processor == ours.image_processor

    cfg = VipLlavaConfig.from_hf_dict({**cfg.to_hf_dict(), "image_token_index": 3})
    cfg.save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="image_token_index is 3"):
        VipLlavaProcessor.from_pretrained(tmp_path)


def test_for_config(tokenizer_dir, ours):
    cfg = VipLlavaConfig.from_hf_dict({
        "model_type": "vipllava", "image_token_index": ours.image_token_id,
        "vision_config": {"image_size": IMAGE_SIZE, "patch_size": PATCH},
    })
    proc = VipLlavaProcessor.for_config(ours.tokenizer, cfg)
    assert proc.num_image_tokens == NUM_IMAGE_TOKENS
    assert proc.image_processor == ours.image_processor


def test_preprocessor_upsampling_and_padded_crop():
    """Upsampling (image smaller than the size) and a crop larger than the image (zero pad)."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    rng = np.random.default_rng(2)
    small = rng.integers(0, 256, (17, 30, 3), dtype=np.uint8)
    hf = CLIPImageProcessorPil(size={"shortest_edge": 50}, crop_size={"height": 50, "width": 50})
    np.testing.assert_allclose(
        CLIPImagePreprocessor.for_size(50)(small), hf(small, return_tensors="np")["pixel_values"],
        rtol=0, atol=1e-6,
    )
    hf = CLIPImageProcessorPil(do_resize=False, crop_size={"height": 25, "width": 20})
    ours = CLIPImagePreprocessor(do_resize=False, crop_size=(25, 20))
    np.testing.assert_allclose(
        ours(small), hf(small, return_tensors="np")["pixel_values"], rtol=0, atol=1e-6
    )


def test_accepts_transformers_image_processor(hf, ours):
    proc = VipLlavaProcessor(hf.tokenizer, hf.image_processor, num_image_tokens=NUM_IMAGE_TOKENS)
    assert proc.image_processor == ours.image_processor


def test_pad_to_square_matches_original_expand2square(hf, images):
    """ViP-LLaVA's own preprocessing: expand2square with the mean colour, then CLIP."""

    def expand2square(pil_img, background_color):  # the original repository's function
        width, height = pil_img.size
        if width == height:
            return pil_img
        if width > height:
            result = PIL.Image.new(pil_img.mode, (width, width), background_color)
            result.paste(pil_img, (0, (width - height) // 2))
            return result
        result = PIL.Image.new(pil_img.mode, (height, height), background_color)
        result.paste(pil_img, ((height - width) // 2, 0))
        return result

    pre = CLIPImagePreprocessor.for_size(IMAGE_SIZE, pad_to_square=True)
    fill = tuple(int(x * 255) for x in hf.image_processor.image_mean)
    squared = [expand2square(im, fill) for im in images["pil"]]
    expected = hf.image_processor(squared, return_tensors="np")["pixel_values"]
    np.testing.assert_allclose(pre(images["np"]), expected, rtol=0, atol=1e-6)


def test_bad_inputs(ours, tokenizer_dir):
    with pytest.raises(VipLlavaError, match="uint8"):
        ours(images=np.zeros((8, 8, 3), np.float32))
    with pytest.raises(VipLlavaError, match="not a single token"):
        VipLlavaProcessor(
            tokenizer_dir, image_size=IMAGE_SIZE, num_image_tokens=9, image_token="<img>"
        )
    with pytest.raises(VipLlavaError, match="image_processor or image_size"):
        VipLlavaProcessor(tokenizer_dir, num_image_tokens=9)


# --- visual prompts: drawn before preprocessing -----------------------------------------------


@pytest.mark.parametrize("template", ["vipllava", "llava_v1"])
def test_visual_prompts_equal_premarked_images(ours, images, template):
    rect = VisualPrompt(marker="rectangle", box=(15, 12, 35, 30), color="red")
    pt = VisualPrompt(marker="point", point=(20, 30), color="lime", style="random", seed=4)
    arrow = VisualPrompt(marker="arrow", box=(10, 10, 30, 30), color="blue")
    vps = [rect, [pt, arrow], None]
    prompts = [build_prompt(QUESTIONS[0], template=template),
               build_prompt(QUESTIONS[2], template=template) + " <image>"]
    pils = images["pil"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the crop warning has its own test
        got = ours(prompts, [pils[:1], pils[1:]], visual_prompts=vps)
        premarked = [draw_visual_prompts(pils[0], [rect]), draw_visual_prompts(pils[1], [pt, arrow]),
                     pils[2]]
        want = ours(prompts, [premarked[:1], premarked[1:]])
    for key in want:
        np.testing.assert_array_equal(got[key], want[key])
    plain = ours(prompts, [pils[:1], pils[1:]])["pixel_values"]
    assert not np.array_equal(got["pixel_values"][0], plain[0])
    np.testing.assert_array_equal(got["pixel_values"][2], plain[2])
    assert (np.asarray(pils[0]) == images["np"][0]).all()  # the caller's image is not drawn on


def test_visual_prompt_cut_by_center_crop_warns(tokenizer_dir):
    wide = np.full((40, 120, 3), 200, np.uint8)  # the crop keeps the middle third of the width
    edge = VisualPrompt(marker="ellipse", box=(2, 5, 30, 35), color="red")
    middle = VisualPrompt(marker="rectangle", box=(50, 5, 70, 35), color="red")
    crop = VipLlavaProcessor(tokenizer_dir, image_size=IMAGE_SIZE, num_image_tokens=NUM_IMAGE_TOKENS)
    with pytest.warns(UserWarning, match="cuts off part of the ellipse marker on image 0"):
        crop(images=[wide], visual_prompts=[edge])
    square = VipLlavaProcessor(
        tokenizer_dir, CLIPImagePreprocessor.for_size(IMAGE_SIZE, pad_to_square=True),
        num_image_tokens=NUM_IMAGE_TOKENS,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        crop(images=[wide], visual_prompts=[middle])
        out = square(images=[wide], visual_prompts=[edge])
    # With pad_to_square the marker survives: the left of the padded image is red-tinted.
    plain = square(images=[wide])["pixel_values"]
    assert not np.array_equal(out["pixel_values"], plain)


def test_visual_prompt_errors(ours, images):
    with pytest.raises(VipLlavaError, match="1 visual_prompts entries were given for 2 image"):
        ours(images=images["pil"][:2], visual_prompts=[None])
    with pytest.raises(VisualPromptError, match="not inside"):
        ours(images=images["pil"][0], visual_prompts=[VisualPrompt(marker="mask", box=(0, 0, 99, 9))])


# --- prompt builder: exact strings of the model card and the original -------------------------------------------------


def test_vipllava_prompt_single_turn():
    assert build_prompt("What is this?") == (
        "A chat between a curious human and an artificial intelligence assistant. The assistant "
        "gives helpful, detailed, and polite answers to the human's questions.###Human: <image>\n"
        "What is this?###Assistant:"
    )
    assert build_prompt([("What is this?", None)]) == build_prompt("What is this?")


def test_vipllava_prompt_multi_turn():
    assert build_prompt([("p1", "a1"), ("p2", None)]) == (
        VIPLLAVA_SYSTEM + "###Human: <image>\np1###Assistant: a1###Human: p2###Assistant:"
    )


def test_llava_v1_prompt():
    assert build_prompt([("p1", "a1"), ("p2", None)], template="llava_v1") == (
        "A chat between a curious human and an artificial intelligence assistant. The assistant "
        "gives helpful, detailed, and polite answers to the human's questions. USER: <image>\np1 "
        "ASSISTANT: a1</s>USER: p2 ASSISTANT:"
    )
    single = build_prompt("p1", template="llava_v1")
    assert single == LLAVA_V1_SYSTEM + " USER: <image>\np1 ASSISTANT:"


def test_prompt_dict_turns_choose_images():
    turns = [{"user": "p1", "assistant": "a1", "image": False}, {"user": "p2", "image": True}]
    assert build_prompt(turns) == (
        VIPLLAVA_SYSTEM + "###Human: p1###Assistant: a1###Human: <image>\np2###Assistant:"
    )
    two = build_prompt([{"user": "p", "image": 2}])
    assert two.endswith("###Human: <image>\n<image>\np###Assistant:")


def test_prompt_errors():
    with pytest.raises(VipLlavaError, match="unknown template"):
        build_prompt("p", template="chatml")
    with pytest.raises(VipLlavaError, match="turn 0 has no answer"):
        build_prompt([("p1", None), ("p2", None)])
    with pytest.raises(VipLlavaError, match="at least one turn"):
        build_prompt([])
