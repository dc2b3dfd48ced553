"""What a training run is told: the run (`RunConfig`, a TOML file + key=value overrides) and
its optimizer and step settings (`TrainConfig`, the run config's [train] table)."""

from __future__ import annotations

import dataclasses
import math
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax

from vipllava_jax import storage
from vipllava_jax.errors import VipLlavaError
from vipllava_jax.registry import STAGES
from vipllava_jax.train import lora

# Remat policies of each decoder layer (the `remat=` of the model's `loss_terms`).
REMAT_POLICIES: dict[str, Callable[..., bool] | None] = {
    "none": None,  # no rematerialisation: every activation is kept
    "full": jax.checkpoint_policies.nothing_saveable,  # keep only each layer's input
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep weight matmuls
}

# TrainConfig.attention choices (resolved per model part by `step.attention_kernels`).
ATTENTION = ("auto", "xla", "cudnn", "pallas")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimizer, schedule and step settings.

    Attributes:
      learning_rate: peak learning rate, reached after `warmup_steps` (linear from 0), then
        cosine decay to 0 at `total_steps`.
      weight_decay: AdamW decoupled weight decay, applied to matrices only (kernels and
        embeddings), not to biases and norm scales (as transformers' Trainer).
      max_grad_norm: gradients are clipped to this global norm before AdamW.
      grad_accum: micro-batches per step; the global batch size must be a multiple.
      stage: what is trained, a name from the model's `train_stages`. VipLlava:
        "projector" (stage 1: projector only), "full" (stage 2: projector, decoder and
        lm_head), "lora" (projector + LoRA adapters on the decoder's projections, the
        decoder's own weights frozen: optimizer state and gradients only for the adapters),
        all with the vision tower frozen; or "all" (everything, for a model trained from
        scratch). VisionEncoderDecoder: "decoder" (projection + decoder) or "all".
      lora_rank, lora_alpha, lora_targets: the adapters of stage "lora": rank r, scale
        alpha / r, and which projections of each decoder layer get one (`lora.TARGETS`).
      remat: "none", "full" or "dots": rematerialisation of each decoder layer's activations
        in the backward pass (`REMAT_POLICIES`).
      attention: the attention kernel of the model's parts that have a fused path (the
        model's `attention_dtypes`: VipLlava's decoder and vision tower). "xla": XLA's
        softmax(QK^T)V from a dense mask, which materialises every layer's [B, N, T, T]
        scores; "cudnn": cuDNN's fused flash attention (NVIDIA GPUs, bf16/fp16 compute; the
        batch must be right-padded, as the training loaders make it); "pallas": JAX's Pallas
        splash-attention kernel for TPUs (any dtype; right-padded batches too; causal,
        sliding-window and full masks; GQA as it is); "auto": "cudnn" where
        the mesh is on NVIDIA GPUs, for the parts computing in bf16/fp16, "pallas" on TPUs,
        else "xla" (benchmarks/gpu_hlo.py and benchmarks/tpu_hlo.py compare their step costs).
      lr_multipliers: {top-level submodule: factor}: that submodule's updates (learning rate
        and weight decay alike) times the factor, e.g. `{"vision_tower": 0.1}` (LLaVA-NeXT's
        separate vision tower learning rate). Names must be trained by the stage.
    """

    learning_rate: float = 2e-5
    warmup_steps: int = 0
    total_steps: int = 1000
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: float = 1.0
    grad_accum: int = 1
    stage: str = "full"
    remat: str = "none"
    attention: str = "auto"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = lora.TARGETS
    lr_multipliers: tuple[tuple[str, float], ...] = ()  # a dict is accepted (and converted)

    def __post_init__(self):
        _check_field_types(self, "[train] ")
        for name in ("learning_rate", "eps", "max_grad_norm"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise ValueError(f"[train] {name} must be a finite number > 0, got {getattr(self, name)}")
        if not self.weight_decay >= 0:
            raise ValueError(f"[train] weight_decay must be >= 0, got {self.weight_decay}")
        for name in ("b1", "b2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"[train] {name} must be in [0, 1), got {getattr(self, name)}")
        if self.total_steps < 1:
            raise ValueError(f"[train] total_steps must be >= 1, got {self.total_steps}")
        multipliers = dict(self.lr_multipliers)
        if any(not isinstance(f, (int, float)) or f < 0 for f in multipliers.values()):
            raise ValueError(
                f"lr_multipliers must map submodule names to factors >= 0, got {multipliers}")
        multipliers = tuple(sorted((str(k), float(f)) for k, f in multipliers.items()))
        object.__setattr__(self, "lr_multipliers", multipliers)  # hashable, like the other fields
        if self.stage not in STAGES:  # checked against the model by init_train_state
            raise ValueError(f"stage must be one of {sorted(STAGES)}, got {self.stage!r}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat must be one of {sorted(REMAT_POLICIES)}, got {self.remat!r}")
        object.__setattr__(self, "lora_targets", lora.check_targets(self.lora_targets))
        if self.attention not in ATTENTION:
            raise ValueError(f"attention must be one of {ATTENTION}, got {self.attention!r}")
        if self.lora_rank < 1:
            raise ValueError(f"lora_rank must be >= 1, got {self.lora_rank}")
        if self.grad_accum < 1:
            raise ValueError(f"grad_accum must be >= 1, got {self.grad_accum}")
        if self.warmup_steps < 0:
            raise ValueError(f"[train] warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.warmup_steps > self.total_steps:
            raise ValueError(
                f"[train] warmup_steps ({self.warmup_steps}) is longer than the schedule's "
                f"total_steps ({self.total_steps}, which is `steps` unless [train] sets it): "
                "lower warmup_steps or raise steps"
            )


_TYPES = {"int": int, "float": (int, float), "str": str, "bool": bool}


def _check_field_types(obj, where: str) -> None:
    """Fields annotated int, float, str or bool (or `X | None`) hold such a value (a bool is
    not a number here): a config value of the wrong kind is a one-line error naming it."""
    for f in dataclasses.fields(obj):
        kind, _, none = f.type.partition(" | ")
        if kind not in _TYPES:
            continue
        value = getattr(obj, f.name)
        if value is None and none == "None":
            continue
        if isinstance(value, bool) and kind != "bool" or not isinstance(value, _TYPES[kind]):
            raise ValueError(f"{where}{f.name} must be {'a' if kind != 'int' else 'an'} {kind}, got {value!r}")
        if kind == "float":
            object.__setattr__(obj, f.name, float(value))


class TrainingError(VipLlavaError):
    """The run cannot go on (non-finite loss, bad configuration)."""


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """A training run. `train` holds the optimizer and step settings (`TrainConfig`)."""

    model: str  # an Orbax folder from vipllava-convert (or an HF folder) with tokenizer files
    data: str  # LLaVA-format JSON or JSONL
    output_dir: str
    image_folder: str | None = None
    mesh: str = "data=-1"
    batch_size: int = 8  # global: each of the jax.process_count() processes loads its share
    max_length: int = 1024
    template: str = "vipllava"
    # VipLlava images: "pad" to a square of the mean colour first, as the original's stages 2-3
    # train (`image_aspect_ratio pad`); "crop": transformers' resize + center crop
    image_aspect_ratio: str = "pad"
    seed: int = 0
    steps: int = 1000
    save_every: int = 100
    keep: int = 3
    dtype: str = "bfloat16"  # compute
    param_dtype: str = "float32"  # master weights
    strict: bool = False
    num_workers: int = 4
    worker_type: str = "threads"  # or "processes" (see training.data: they pay on many cores)
    log_every: int = 1
    tensorboard: bool = True  # also write TensorBoard event files to output_dir/tensorboard
    peak_tflops: float | None = None  # per device, for MFU; None: looked up by device kind
    stop_after: int | None = None  # stop early at this step (as if killed), for tests
    # several hosts, when not from the JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
    # JAX_PROCESS_ID environment or a detected cluster (train/hosts.py)
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)

    def __post_init__(self):
        _check_field_types(self, "")
        for name in ("batch_size", "max_length", "steps", "save_every", "keep", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if self.image_aspect_ratio not in ("pad", "crop"):
            raise ValueError(f"image_aspect_ratio must be 'pad' or 'crop', got {self.image_aspect_ratio!r}")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be in [0, 2**32), got {self.seed}")
        if self.stop_after is not None and self.stop_after < 1:
            raise ValueError(f"stop_after must be >= 1, got {self.stop_after}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        d = dict(d)
        train = d.pop("train", {})
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise TrainingError(f"unknown config keys: {unknown}")
        train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
        unknown = sorted(set(train) - train_fields)
        if unknown:
            raise TrainingError(f"unknown [train] keys: {unknown}")
        train.setdefault("total_steps", d.get("steps", 1000))
        try:
            return cls(**d, train=TrainConfig(**train))
        except (TypeError, ValueError) as e:
            raise TrainingError(f"bad config: {e}") from None

    @classmethod
    def from_file(cls, path: str | Path, overrides: list[str] = ()) -> RunConfig:
        """A TOML file (local or gs://), then `key=value` overrides (`train.learning_rate=1e-4`,
        `steps=10`)."""
        try:
            d = tomllib.loads(storage.read_text(path))
        except tomllib.TOMLDecodeError as e:
            raise TrainingError(f"{path}: invalid TOML ({e})") from None
        except UnicodeDecodeError:
            raise TrainingError(f"{path}: not a text file") from None
        for item in overrides:
            key, sep, raw = item.partition("=")
            if not sep:
                raise TrainingError(f"override {item!r} is not key=value")
            try:
                value = tomllib.loads(f"v = {raw}")["v"]
            except tomllib.TOMLDecodeError:
                value = raw  # a bare string
            *parents, leaf = key.split(".")
            node = d
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = value
        return cls.from_dict(d)
