"""Text + image preprocessing for VipLlava, equal to transformers' `LlavaProcessor`.

`VipLlavaProcessor(text, images)` expands every `<image>` placeholder into `num_image_tokens`
image tokens (one per projected image feature, so the model's shapes are static), tokenizes,
pads on the LEFT (the generation convention) and preprocesses the images like
`CLIPImageProcessor`'s PIL backend: RGB, resize the shortest edge (bicubic), center crop,
scale by 1/255 and normalize with the CLIP mean and std. The image code is PIL + numpy only, so
the pixels do not depend on torchvision (whose resize differs by up to 0.03 after normalizing)
nor on the installed transformers version.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vipllava_jax import hub, storage
from vipllava_jax.errors import ConfigError, VipLlavaError
from vipllava_jax.models.vipllava.config import VipLlavaConfig
from vipllava_jax.processing.images import (  # noqa: F401  (public here too)
    CLIP_MEAN,
    CLIP_STD,
    CLIPImagePreprocessor,
    ImageInput,
    center_crop,
    expand_to_square,
    is_single_image,
    load_image,
    quiet_transformers,
)
from vipllava_jax.processing.prompts import build_prompt
from vipllava_jax.processing.visual_prompts import VisualPrompt, crop_cuts_marker, draw_visual_prompts


def _flatten_images(images: Any) -> tuple[list[ImageInput], list[int] | None]:
    """A flat image list, and per-prompt counts when given nested (one list per prompt)."""
    if images is None:
        return [], None
    if is_single_image(images):
        return [images], None
    images = list(images)
    if images and all(isinstance(im, (list, tuple)) for im in images):
        return [im for group in images for im in group], [len(group) for group in images]
    return images, None


class VipLlavaProcessor:
    """Tokenizer + image preprocessing for VipLlava (a drop-in for transformers' LlavaProcessor).

    Attributes:
        tokenizer: the transformers tokenizer.
        image_processor: the `CLIPImagePreprocessor`.
        num_image_tokens: image tokens one `<image>` placeholder expands to.
        image_token: the placeholder string; image_token_id its id.
        pad_token_id: the id padding positions get.
    """

    def __init__(
        self,
        tokenizer: Any,
        image_processor: CLIPImagePreprocessor | Any | None = None,
        *,
        num_image_tokens: int,
        image_size: int | None = None,
        image_token: str = "<image>",
    ):
        """Builds a processor from its parts (e.g. for a tiny test model without processor files).

        Args:
            tokenizer: a transformers tokenizer, or a folder to load one from.
            image_processor: a `CLIPImagePreprocessor`, a transformers CLIP image processor
                (its settings are copied), or None to use CLIP preprocessing at `image_size`.
            num_image_tokens: image tokens per `<image>` (`VipLlavaConfig.num_image_tokens`).
            image_size: the vision tower's input size; only used when image_processor is None.
            image_token: the placeholder string; must be a single token of the tokenizer.

        Raises:
            VipLlavaError: the image token is not one token, or no image size is known.
        """
        if isinstance(tokenizer, (str, Path)):
            tokenizer = load_tokenizer(tokenizer)
        if image_processor is None:
            if image_size is None:
                raise VipLlavaError("pass image_processor or image_size")
            image_processor = CLIPImagePreprocessor.for_size(image_size)
        elif not isinstance(image_processor, CLIPImagePreprocessor):
            image_processor = CLIPImagePreprocessor.from_hf_dict(image_processor.to_dict())
        if num_image_tokens < 1:
            raise VipLlavaError(f"num_image_tokens must be positive, got {num_image_tokens}")
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.num_image_tokens = int(num_image_tokens)
        self.image_token = image_token
        ids = tokenizer.encode(image_token, add_special_tokens=False)
        if len(ids) != 1 or ids[0] == tokenizer.unk_token_id:
            raise VipLlavaError(
                f"image token {image_token!r} is not a single token of the tokenizer (ids {ids})"
            )
        self.image_token_id = ids[0]
        pad = tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else (tokenizer.eos_token_id or 0)
        if self.pad_token_id == self.image_token_id:
            raise VipLlavaError(f"the pad token id equals the image token id {self.image_token_id}")

    @classmethod
    def for_config(cls, tokenizer: Any, config: VipLlavaConfig, *, image_token: str = "<image>",
                   **preprocessor_kw) -> VipLlavaProcessor:
        """A processor for the model `config` describes: CLIP preprocessing at its image size and
        `config.num_image_tokens` tokens per image.

        Raises:
            ConfigError: the tokenizer's image token id is not `config.image_token_index`.
        """
        image_processor = CLIPImagePreprocessor.for_size(
            config.vision_config.image_size, **preprocessor_kw
        )
        proc = cls(
            tokenizer, image_processor, num_image_tokens=config.num_image_tokens,
            image_token=image_token,
        )
        proc._check_config(config)
        return proc

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        num_image_tokens: int | None = None,
        image_token: str | None = None,
        pad_to_square: bool = False,
        revision: str | None = None,
    ) -> VipLlavaProcessor:
        """Loads a folder holding a tokenizer and, optionally, processor files (as written by
        `LlavaProcessor.save_pretrained`, old or new layout) and a VipLlava `config.json`.

        The image token count is, in order: `num_image_tokens`, the model config's
        `num_image_tokens`, the processor config's `image_seq_length`, or LlavaProcessor's rule
        `(H // patch_size) * (W // patch_size) + num_additional_image_tokens` (minus 1 when
        `vision_feature_select_strategy == "default"`).

        Args:
            path: the folder, or a hub id (at `revision`; `vipllava_jax.hub`).
            num_image_tokens: overrides the count found in the folder.
            image_token: overrides the placeholder string (default: the processor config's, or
                "<image>").
            pad_to_square: pad images to squares first (see `CLIPImagePreprocessor`).

        Raises:
            ConfigError: nothing says how to preprocess images or how many tokens an image takes,
                or the model config disagrees with the tokenizer on the image token id.
        """
        path = storage.local_mirror(hub.resolve(path, revision=revision))  # transformers reads local files
        proc_cfg = _read_json(path / "processor_config.json") or {}
        image_cfg = proc_cfg.get("image_processor") or _read_json(path / "preprocessor_config.json")
        model_cfg = _read_json(path / "config.json") or {}
        model_cfg = (
            VipLlavaConfig.from_hf_dict(model_cfg)
            if model_cfg.get("model_type") == "vipllava" else None
        )

        if image_cfg:
            image_processor = CLIPImagePreprocessor.from_hf_dict(
                image_cfg, pad_to_square=pad_to_square
            )
        elif model_cfg:
            image_processor = CLIPImagePreprocessor.for_size(
                model_cfg.vision_config.image_size, pad_to_square=pad_to_square
            )
        else:
            raise ConfigError(f"{path} has no image processor config and no VipLlava config.json")

        from_proc = _tokens_from_processor_config(proc_cfg, image_processor)
        if num_image_tokens is None and model_cfg is not None:
            num_image_tokens = model_cfg.num_image_tokens
            if from_proc is not None and from_proc != num_image_tokens:
                warnings.warn(
                    f"{path}: the processor config gives {from_proc} image tokens but the model "
                    f"takes {num_image_tokens}; using {num_image_tokens}", stacklevel=2,
                )
        num_image_tokens = num_image_tokens or from_proc
        if num_image_tokens is None:
            raise ConfigError(
                f"{path}: cannot tell how many tokens an image takes; pass num_image_tokens"
            )

        tokenizer = load_tokenizer(path)
        image_token = (
            image_token or proc_cfg.get("image_token")
            or getattr(tokenizer, "image_token", None) or "<image>"
        )
        proc = cls(
            tokenizer, image_processor, num_image_tokens=num_image_tokens, image_token=image_token
        )
        if model_cfg is not None:
            proc._check_config(model_cfg)
        return proc

    def _check_config(self, config: VipLlavaConfig) -> None:
        if config.image_token_index != self.image_token_id:
            raise ConfigError(
                f"the tokenizer maps {self.image_token!r} to {self.image_token_id} but the model's "
                f"image_token_index is {config.image_token_index}"
            )

    def apply_chat_template(self, messages, *, template: str = "vipllava") -> str:
        """transformers' chat messages as this model's prompt (`prompts.build_prompt`), ending
        where the assistant's answer starts when the last message is the user's."""
        return build_prompt(messages, template=template, image_token=self.image_token)

    def __call__(
        self,
        text: str | Sequence[str] | None = None,
        images: ImageInput | Sequence[ImageInput] | Sequence[Sequence[ImageInput]] | None = None,
        *,
        padding: bool | str = True,
        max_length: int | None = None,
        pad_to_multiple_of: int | None = None,
        padding_side: str = "left",
        return_tensors: str | None = "np",
        visual_prompts: Sequence[VisualPrompt | Sequence[VisualPrompt] | None] | None = None,
    ) -> dict[str, Any]:
        """Tokenizes prompts and preprocesses their images.

        Args:
            text: one prompt or a batch. Each `image_token` marks where the next image goes.
            images: the images, in placeholder order over the whole batch: one image, a flat
                list, or one list per prompt. PIL images, HWC uint8 arrays or file paths.
            padding: True / "longest" pads to the longest prompt, "max_length" to `max_length`,
                False pads nothing (all prompts must then have equal length, unless
                `return_tensors` is None). Prompts are never truncated.
            max_length: the length for `padding="max_length"`.
            pad_to_multiple_of: round the padded length up to a multiple of this (fewer
                distinct shapes, fewer recompilations).
            padding_side: "left" (generation) or "right".
            return_tensors: "np" for numpy arrays, None for python lists.
            visual_prompts: markers to draw on the images before preprocessing, one entry per
                image in the flat placeholder order: a `VisualPrompt`, a list of them (drawn in
                order) or None. A warning names the marker when the center crop would cut part
                of it off (pass `pad_to_square=True` to keep it whole, as the original does).

        Returns:
            A dict with `input_ids` [B, T] int64 and `attention_mask` [B, T] int64 when text is
            given, and `pixel_values` [num_images, 3, H, W] float32 when images are given.

        Raises:
            VipLlavaError: placeholder and image counts differ, a prompt is longer than
                `max_length`, unpadded prompts of different lengths were asked for as arrays,
                or `visual_prompts` does not have one entry per image.
            VisualPromptError: a marker cannot be drawn on its image.
        """
        if text is None and images is None:
            raise VipLlavaError("pass text, images or both")
        if padding_side not in ("left", "right"):
            raise VipLlavaError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        if return_tensors not in ("np", None):
            raise VipLlavaError(f"return_tensors must be 'np' or None, got {return_tensors!r}")
        flat_images, per_prompt = _flatten_images(images)
        if visual_prompts is not None:
            flat_images = self._draw_visual_prompts(flat_images, visual_prompts)
        out: dict[str, Any] = {}
        if text is not None:
            texts = [text] if isinstance(text, str) else list(text)
            self._check_counts(texts, len(flat_images), per_prompt)
            ids = self._tokenize(texts)
            ids, mask = self._pad(ids, padding, max_length, pad_to_multiple_of, padding_side)
            if return_tensors == "np":
                if len({len(row) for row in ids}) > 1:
                    raise VipLlavaError(
                        "prompts have different lengths; pass padding=True or return_tensors=None"
                    )
                ids, mask = np.asarray(ids, np.int64), np.asarray(mask, np.int64)
            out["input_ids"], out["attention_mask"] = ids, mask
        if flat_images:
            out["pixel_values"] = self.image_processor(flat_images)
        return out

    def _draw_visual_prompts(
        self, images: list[ImageInput], visual_prompts: Sequence[Any]
    ) -> list[ImageInput]:
        """The images with their markers drawn, warning where the center crop cuts one."""
        if isinstance(visual_prompts, VisualPrompt):
            visual_prompts = [visual_prompts]
        visual_prompts = list(visual_prompts)
        if len(visual_prompts) != len(images):
            raise VipLlavaError(
                f"{len(visual_prompts)} visual_prompts entries were given for {len(images)} "
                f"image(s); pass one per image (a VisualPrompt, a list of them, or None)"
            )
        ip = self.image_processor
        crops = ip.do_center_crop and not ip.pad_to_square
        out = []
        for i, (image, vps) in enumerate(zip(images, visual_prompts)):
            if vps is None:
                out.append(image)
                continue
            vps = [vps] if isinstance(vps, VisualPrompt) else list(vps)
            marked = draw_visual_prompts(image, vps)
            if crops:
                resized = ip._resized_hw(marked.height, marked.width) if ip.do_resize else (
                    marked.height, marked.width)
                for vp in vps:
                    if crop_cuts_marker(marked.size, vp, size=resized, crop_size=ip.crop_size):
                        warnings.warn(
                            f"the center crop cuts off part of the {vp.marker} marker on image "
                            f"{i}; pad_to_square=True (the original ViP-LLaVA preprocessing) "
                            f"keeps it whole", stacklevel=3,
                        )
            out.append(marked)
        return out

    def _check_counts(
        self, texts: list[str], num_images: int, per_prompt: list[int] | None
    ) -> None:
        counts = [t.count(self.image_token) for t in texts]
        if sum(counts) != num_images:
            raise VipLlavaError(
                f"the text has {sum(counts)} {self.image_token} placeholder(s) but {num_images} "
                f"image(s) were given"
            )
        if per_prompt is not None:
            if len(per_prompt) != len(texts):
                raise VipLlavaError(
                    f"{len(per_prompt)} image lists were given for {len(texts)} prompts"
                )
            for i, (c, n) in enumerate(zip(counts, per_prompt)):
                if c != n:
                    raise VipLlavaError(
                        f"prompt {i} has {c} {self.image_token} placeholder(s) but {n} "
                        f"image(s) were given"
                    )

    def _tokenize(self, texts: list[str]) -> list[list[int]]:
        expanded = self.image_token * self.num_image_tokens
        expanded = [t.replace(self.image_token, expanded) for t in texts]
        ids = self.tokenizer(expanded, add_special_tokens=True)["input_ids"]
        for t, row in zip(texts, ids):
            want = t.count(self.image_token) * self.num_image_tokens
            got = row.count(self.image_token_id)
            if got != want:  # e.g. the token got merged with its neighbours
                raise VipLlavaError(
                    f"tokenizing gave {got} image tokens where {want} were expected"
                )
        return [list(row) for row in ids]

    def _pad(self, ids, padding, max_length, multiple, side):
        if padding in (True, "longest"):
            target = max(len(row) for row in ids)
        elif padding == "max_length":
            if max_length is None:
                raise VipLlavaError("padding='max_length' needs max_length")
            target = max_length
        elif padding in (False, "do_not_pad"):
            return ids, [[1] * len(row) for row in ids]
        else:
            raise VipLlavaError(
                f"padding must be True, False, 'longest' or 'max_length', got {padding!r}"
            )
        if max_length is not None and (longest := max(len(row) for row in ids)) > max_length:
            raise VipLlavaError(f"a prompt has {longest} tokens, more than max_length={max_length}")
        if multiple:
            target = -(-target // multiple) * multiple
        out_ids, out_mask = [], []
        for row in ids:
            pad = target - len(row)
            ids_pad, mask_pad = [self.pad_token_id] * pad, [0] * pad
            if side == "left":
                out_ids.append(ids_pad + row)
                out_mask.append(mask_pad + [1] * len(row))
            else:
                out_ids.append(row + ids_pad)
                out_mask.append([1] * len(row) + mask_pad)
        return out_ids, out_mask

    def batch_decode(self, ids: Any, skip_special_tokens: bool = True, **kw) -> list[str]:
        """Decodes a batch of token ids [B, T] (numpy, jax or lists) with the tokenizer."""
        ids = np.asarray(ids).tolist()
        return self.tokenizer.batch_decode(ids, skip_special_tokens=skip_special_tokens, **kw)

    def decode(self, ids: Any, skip_special_tokens: bool = True, **kw) -> str:
        """Decodes one sequence of token ids [T] with the tokenizer."""
        ids = np.asarray(ids).tolist()
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens, **kw)


def _read_json(file: Path) -> dict[str, Any] | None:
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{file} is not valid JSON: {e}") from None


def _tokens_from_processor_config(
    cfg: dict[str, Any], image_processor: CLIPImagePreprocessor
) -> int | None:
    """The image token count a LlavaProcessor with this config would expand `<image>` to."""
    if cfg.get("image_seq_length"):
        return int(cfg["image_seq_length"])
    patch, hw = cfg.get("patch_size"), image_processor.output_size
    if not patch or hw is None:
        return None
    n = (hw[0] // patch) * (hw[1] // patch) + cfg.get("num_additional_image_tokens", 0)
    return n - 1 if cfg.get("vision_feature_select_strategy") == "default" else n


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(path: str | Path):
    """transformers' `AutoTokenizer` for the folder `path`, quietly (see `quiet_transformers`).

    Raises:
        ConfigError: the folder has no tokenizer files, or transformers cannot read them.
    """
    path = storage.local_mirror(path)
    if path.is_dir() and not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise ConfigError(
            f"{path} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); copy the tokenizer "
            "files of the original checkpoint into it"
        )
    quiet_transformers()
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read the tokenizer in {path}: {str(e).splitlines()[0]}") from None

