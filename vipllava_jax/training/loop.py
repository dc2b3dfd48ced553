"""The fine-tuning loop: data -> sharded train step -> metrics and Orbax checkpoints, resumable.

    RunConfig (a TOML file + key=value overrides)
      model folder --from_pretrained--> model --init_train_state--> TrainState on the mesh
      TrainDataLoader --shard_batch--> step --> metrics.jsonl, stdout
      every `save_every` steps: CheckpointManager.save(step, {state, data position}) (async)

On start, the latest complete checkpoint in `output_dir/checkpoints` is restored (onto this
run's mesh, whatever mesh wrote it), so a killed run loses at most the steps since its last
complete save. A non-finite loss stops the run before anything is saved for that step.
On several hosts (`jax.distributed.initialize` before `train`) every process runs `train`
with the same config: each loads `batch_size // process_count` rows, `shard_batch` assembles the
global batch, all save the checkpoint together (with every host's data position), and process
0 alone writes metrics.jsonl and the output folder's files.
There is no dropout in VipLlava, so the state needs no RNG: a resumed run reproduces the
losses of an uninterrupted one exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import re
import shutil
import time
import tomllib
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from tqdm.auto import tqdm

from vipllava_jax.errors import VipLlavaError
from vipllava_jax.modeling import VipLlavaForConditionalGeneration
from vipllava_jax.processor import VipLlavaProcessor
from vipllava_jax.ved.config import MODEL_TYPE as VED_MODEL_TYPE
from vipllava_jax.ved.config import VisionEncoderDecoderConfig, read_model_type
from vipllava_jax.ved.modeling import VisionEncoderDecoderModel
from vipllava_jax.training.data import CaptionDataLoader, RecordLoader, TrainDataLoader
from vipllava_jax.training.lora import merge_lora
from vipllava_jax.training.mesh import mesh_from_spec, shard_batch
from vipllava_jax.training.step import (
    TrainConfig, TrainState, init_train_state, make_train_step, merge_model,
)


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
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)

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
        """A TOML file, then `key=value` overrides (`train.learning_rate=1e-4`, `steps=10`)."""
        d = tomllib.loads(Path(path).read_text())
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


def _checkpoint_manager(cfg: RunConfig) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=cfg.keep, save_interval_steps=1, enable_async_checkpointing=True,
    )
    return ocp.CheckpointManager(Path(cfg.output_dir, "checkpoints").absolute(), options=options)


def _prepare_output(cfg: RunConfig) -> Path:
    """The output folder carries the model config and tokenizer files, so that a training
    checkpoint converts back to HF on its own (`vipllava-convert orbax-to-hf OUTPUT_DIR`)."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if jax.process_index() != 0:  # one writer when several processes share the folder
        return out
    for f in Path(cfg.model).iterdir():
        if f.is_file() and f.suffix in (".json", ".txt", ".model") and not f.name.startswith("."):
            if not (out / f.name).exists():
                shutil.copy2(f, out / f.name)
    (out / "run_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
    return out


def train(cfg: RunConfig, *, progress: bool = True) -> list[dict[str, float]]:
    """Runs (or resumes) the training run; returns the metrics of the steps it ran."""
    out = _prepare_output(cfg)
    mesh = mesh_from_spec(cfg.mesh)
    model = _model_class(cfg.model).from_pretrained(
        cfg.model, dtype=cfg.dtype, param_dtype=cfg.param_dtype, mesh=mesh)  # every process its shards
    # batch_size is the global batch; each process loads its share of the rows
    hosts, primary = jax.process_count(), jax.process_index() == 0
    if cfg.batch_size % hosts:
        raise TrainingError(f"batch_size {cfg.batch_size} is not a multiple of the {hosts} processes")
    loader = _data_loader(cfg, model.config, batch_size=cfg.batch_size // hosts)
    model_config = model.config
    graphdef, state, shardings = init_train_state(model, cfg.train, mesh)
    del model
    step_fn = make_train_step(graphdef, cfg.train, mesh, shardings)
    manager = _checkpoint_manager(cfg)
    start = manager.latest_step()
    if start is not None:
        state, data_state = _restore(manager, start, state, shardings)
        loader.load_state_dict(_host_data_state(data_state))
    start = start or 0
    flops_per_token = train_flops_per_token(state, model_config, seq_len=cfg.max_length)
    peak = cfg.peak_tflops or device_peak_tflops(jax.devices()[0])
    if peak is None and primary:
        tqdm.write(f"MFU not estimated: no peak TFLOP/s known for {jax.devices()[0].device_kind!r} "
                   "(set peak_tflops in the config)")
    peak_total = None if peak is None else peak * jax.device_count()
    board = _tensorboard(out) if primary and cfg.tensorboard else None

    history = []
    last = cfg.steps if cfg.stop_after is None else min(cfg.steps, cfg.stop_after)
    batches = iter(loader)
    bar = tqdm(total=cfg.steps, initial=start, desc="train", unit="step", disable=not (progress and primary))
    # metrics are global (the step reduces over all processes): process 0 writes them
    with open(out / "metrics.jsonl", "a") if primary else contextlib.nullcontext() as log:
        for step in range(start + 1, last + 1):
            t0 = time.perf_counter()
            state, metrics = step_fn(state, shard_batch(next(batches), mesh))
            metrics = {k: float(v) for k, v in metrics.items()}  # waits for the step
            seconds = time.perf_counter() - t0
            if not math.isfinite(metrics["loss"]):
                manager.wait_until_finished()
                raise TrainingError(
                    f"loss is {metrics['loss']} at step {step}; stopped without saving it. "
                    f"The last good checkpoint is step {manager.latest_step()}"
                )
            seq_tokens = cfg.batch_size * cfg.max_length  # every position costs compute
            metrics.update(step=step, seconds=seconds, tokens_per_s=seq_tokens / seconds,
                           model_tflops=seq_tokens * flops_per_token / seconds / 1e12,
                           **{f"data_{k}": v for k, v in loader.stats.items()})
            if peak_total is not None:
                metrics["mfu"] = metrics["model_tflops"] / peak_total
            history.append(metrics)
            if primary:
                log.write(json.dumps(metrics) + "\n")
                log.flush()
            if board is not None:
                for k, v in metrics.items():
                    if k != "step":
                        board.add_scalar(f"train/{k}", v, step)
            bar.update()
            if primary and step % cfg.log_every == 0:
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['learning_rate']:.2e}")
                mfu = f" mfu {metrics['mfu']:.1%}" if "mfu" in metrics else ""
                tqdm.write(
                    f"step {step} loss {metrics['loss']:.4f} lr {metrics['learning_rate']:.3e} "
                    f"grad_norm {metrics['grad_norm']:.3f} tokens/s {metrics['tokens_per_s']:.0f}{mfu}"
                )
            if step % cfg.save_every == 0 or step == cfg.steps:
                manager.save(step, args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state),
                    data=ocp.args.JsonSave(_data_state(loader)),
                ))
    bar.close()
    if board is not None:
        board.close()
    manager.wait_until_finished()
    manager.close()
    return history


def _model_class(path: str | Path) -> type:
    """VisionEncoderDecoderModel for a `vision-encoder-decoder` folder, else VipLlava."""
    return VisionEncoderDecoderModel if read_model_type(path) == VED_MODEL_TYPE else VipLlavaForConditionalGeneration


def _data_loader(cfg: RunConfig, model_config, batch_size: int) -> RecordLoader:
    """LLaVA conversations for VipLlava; image-caption pairs for an encoder-decoder."""
    common = dict(batch_size=batch_size, max_length=cfg.max_length, seed=cfg.seed, strict=cfg.strict,
                  num_workers=cfg.num_workers, worker_type=cfg.worker_type)
    if isinstance(model_config, VisionEncoderDecoderConfig):
        from transformers import AutoTokenizer

        from vipllava_jax.ved.processing import image_preprocessor

        eos = model_config.eos_token_id if model_config.eos_token_id is not None else model_config.decoder.eos_token_id
        if isinstance(eos, list):
            eos = eos[0]
        if eos is None:
            raise TrainingError(f"{cfg.model}: the config has no eos_token_id to end captions with")
        return CaptionDataLoader(
            cfg.data, cfg.image_folder, AutoTokenizer.from_pretrained(cfg.model),
            image_preprocessor(cfg.model, model_config.encoder.image_size), eos_token_id=eos, **common)
    return TrainDataLoader(cfg.data, cfg.image_folder, VipLlavaProcessor.from_pretrained(cfg.model),
                           template=cfg.template, **common)


def _text_config(model_config):
    """The config of the text decoder (VipLlava's language model, VED's decoder)."""
    return model_config.decoder if isinstance(model_config, VisionEncoderDecoderConfig) else model_config.text_config


def _tensorboard(out: Path):
    from tensorboardX import SummaryWriter  # imported here: only the primary process writes

    return SummaryWriter(str(out / "tensorboard"))


# Dense bf16 peak TFLOP/s per device, by a substring of `device.device_kind`.
PEAK_TFLOPS: dict[str, float] = {
    "H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0,
    "TPU v4": 275.0, "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v5p": 459.0, "TPU v5": 459.0,
    "TPU v6": 918.0,
}


def device_peak_tflops(device) -> float | None:
    """The dense bf16 peak of `device` from `PEAK_TFLOPS`, or None (CPUs, unknown kinds)."""
    for kind, peak in PEAK_TFLOPS.items():
        if kind in device.device_kind:
            return peak
    return None


# Embedding tables (VipLlava, CLIP, GPT-2, BERT, ViT names): lookups, not matmuls.
_LOOKUPS = ("embed_tokens", "position_embedding", "wte", "wpe", "word_embeddings", "token_type_embeddings",
            "cls_token", "distillation_token")


_WORD_EMBEDDINGS = ("embed_tokens", "wte", "word_embeddings")  # a tied head's weight
# A VED decoder's cross-attention keys and values (GPT-2, BERT): they run on encoder tokens.
_CROSS_KV = re.compile(r"'crossattention'\]\['(c_attn|self'\]\['(key|value))'")


def _is_lookup(path: str) -> bool:
    return any(f"'{name}" in path for name in _LOOKUPS)


def _image_side(model_config) -> tuple[dict[str, int], int, object, str | None]:
    """For the parts that see a row's image (one per training row) instead of its text:
    ({top-level part: tokens it runs on per row}, the tower first; patches per image; the
    tower's config; the part whose weights read the tower's output directly, if any).
    VipLlava: the tower (CLS + patches) and the projector (patches; it starts with a norm);
    VED: the encoder and its projection to the decoder (the encoder's tokens)."""
    if isinstance(model_config, VisionEncoderDecoderConfig):
        enc = model_config.encoder
        patches = (enc.image_size // enc.patch_size) ** 2
        parts = {"encoder": enc.seq_len, "enc_to_dec_proj": enc.seq_len}
        return parts, patches, enc, "enc_to_dec_proj"
    vision = model_config.vision_config
    n = vision.num_patches
    return {"vision_tower": n + 1, "multi_modal_projector": n}, n, vision, None


def train_flops_per_token(state: TrainState, model_config, *, seq_len: int) -> float:
    """Model FLOPs of one training step per sequence position (PaLM's estimate, adapted): the
    matmuls an ideal implementation runs, the same for every kernel choice.

    Per weight matrix entry and per token it runs on, a matmul costs 2 FLOPs forward, 2 more
    for the input gradient and 2 for the weight gradient: 6 for a trained weight (4 where its
    input needs no gradient: the patch embedding, a projection straight off a frozen tower),
    4 for a frozen weight that gradients pass through (a frozen decoder), 2 for a frozen
    tower (forward only). The tower and the projector run on the image's tokens (the patch
    embedding on its patches; a VED decoder's cross-attention keys and values on the
    encoder's), the rest on every position; a tied output head is the word embedding's
    matmul. Attention adds 4 T S D per layer forward (x3 with its backward where trained),
    halved where causal: the decoder's is 6 L T D per position (PaLM counts 12, the full
    square), a VED decoder's cross-attention 12 L S D (S encoder tokens). Left out: embedding
    lookups, norms and biases (no matmuls). Every vision layer is counted, also any past the
    deepest feature layer, which does not run.
    """
    image_side, patches, vision, reads_tower = _image_side(model_config)
    tower = next(iter(image_side))
    tower_trained = tower in state.params
    text = _text_config(model_config)
    layers, width = text.num_hidden_layers, text.hidden_size
    per_row = 6 * layers * seq_len**2 * width  # causal self-attention, forward and backward
    if isinstance(model_config, VisionEncoderDecoderConfig):
        per_row += 12 * layers * seq_len * image_side["encoder"] * width  # cross-attention
    tokens = image_side[tower]  # the tower's own attention, not causal
    per_row += (3 if tower_trained else 1) * 4 * vision.num_hidden_layers * tokens**2 * vision.hidden_size

    def flops_per_use(trained: bool, part: str, key: str) -> int:
        if not trained:
            return 2 if part in image_side else 4
        no_input_grad = "patch_embedding" in key or (part == reads_tower and not tower_trained)
        return 4 if no_input_grad else 6

    for trained, tree in ((True, state.params), (False, state.frozen)):
        for path, x in jax.tree_util.tree_leaves_with_path(tree):
            key, part = jax.tree_util.keystr(path), str(path[0].key)
            if text.tie_word_embeddings and any(f"'{name}'" in key for name in _WORD_EMBEDDINGS):
                per_row += (6 if trained else 4) * x.size * seq_len  # the tied output head
            if x.ndim < 2 or _is_lookup(key) or "'pooler'" in key:  # ViT's pooler never runs
                continue
            if "patch_embedding" in key:
                tokens = patches
            elif _CROSS_KV.search(key):
                tokens = image_side["encoder"]
            else:
                tokens = image_side.get(part, seq_len)
            per_row += flops_per_use(trained, part, key) * x.size * tokens
    return per_row / seq_len


def _data_state(loader: TrainDataLoader) -> dict[str, Any]:
    """The loader position to save. One process: its `state_dict()`. Several: every process's
    (they differ: host index, and position when hosts skip different records) as
    `{"hosts": [...]}`, gathered to all, since only process 0 writes the JSON item."""
    state = loader.state_dict()
    if jax.process_count() == 1:
        return state
    from jax.experimental import multihost_utils

    raw = np.frombuffer(json.dumps(state).encode(), np.uint8)
    size = int(multihost_utils.process_allgather(np.int32(raw.size)).max())
    padded = np.zeros(size, np.uint8)
    padded[:raw.size] = raw
    rows = multihost_utils.process_allgather(padded)
    return {"hosts": [json.loads(bytes(r).rstrip(b"\0")) for r in np.asarray(rows)]}


def _host_data_state(data_state: dict[str, Any]) -> dict[str, Any]:
    """This process's loader state from `_data_state`'s output."""
    if "hosts" not in data_state:
        return data_state
    hosts = data_state["hosts"]
    if len(hosts) != jax.process_count():
        raise TrainingError(
            f"the checkpoint's data state was saved by {len(hosts)} processes, this run has "
            f"{jax.process_count()}")
    return hosts[jax.process_index()]


def _restore(manager, step, state: TrainState, shardings: TrainState):
    target = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
    return restored["state"], restored["data"]


def export_trained_model(output_dir: str | Path, dst: str | Path) -> Path:
    """A training run's latest complete checkpoint (LoRA merged) as a model folder: the Orbax
    folder `from_pretrained` reads, with the run's tokenizer files (which the run copied from
    its model), so that `vipllava-eval` or a next training stage can start from it."""
    dst = Path(dst)
    load_trained_model(output_dir).save_pretrained(dst)
    for f in Path(output_dir).iterdir():
        if f.is_file() and f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy2(f, dst / f.name)
    return dst


def load_trained_model(output_dir: str | Path, step: int | None = None) -> nnx.Module:
    """The model of a training run's checkpoint (the latest complete one by default), with
    any LoRA adapters merged into its weights."""
    out = Path(output_dir)
    cfg = RunConfig.from_dict(json.loads((out / "run_config.json").read_text()))
    mesh = mesh_from_spec("data=1", jax.devices()[:1])
    model = _model_class(cfg.model).from_pretrained(
        cfg.model, dtype=cfg.param_dtype, param_dtype=cfg.param_dtype)
    graphdef, state, shardings = init_train_state(model, cfg.train, mesh)
    manager = _checkpoint_manager(cfg)
    step = manager.latest_step() if step is None else step
    if step is None:
        raise TrainingError(f"no complete checkpoint in {out / 'checkpoints'}")
    state, _ = _restore(manager, step, state, shardings)
    return merge_lora(merge_model(graphdef, state))  # LoRA runs: adapters folded in
