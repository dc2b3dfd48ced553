"""The fine-tuning loop: data -> sharded train step -> metrics and Orbax checkpoints, resumable.

    RunConfig (a TOML file + key=value overrides)
      model folder --from_pretrained--> model --init_train_state--> TrainState on the mesh
      TrainDataLoader --shard_batch--> step --> metrics.jsonl, stdout
      every `save_every` steps: CheckpointManager.save(step, {state, data position}) (async)

On start, the newest complete checkpoint in `output_dir/checkpoints` that restores is restored
(onto this run's mesh, whatever mesh wrote it; newer damaged ones are moved to
`checkpoints.damaged/`), so a killed run loses at most the steps since its last complete save.
A non-finite loss or gradient stops the run before anything is saved for that step, and the
checkpoint of the step before (whose parameters gave it) moves to `checkpoints.nonfinite/`.
SIGINT (Ctrl-C) stops after the step in progress, with a checkpoint of it.
On several hosts (`jax.distributed.initialize` before `train`) every process runs `train`
with the same config: each loads `batch_size // process_count` rows, `shard_batch` assembles the
global batch, all save the checkpoint together (with every host's data position), and process
0 alone writes metrics.jsonl and the output folder's files.
`output_dir` (and `model`) may be a gs:// URL: Orbax writes the checkpoints there itself; the
run lock is a create-if-absent object; metrics.jsonl (an object store cannot append) is
written whole at each checkpoint save and when the run stops.
There is no dropout in VipLlava, so the state needs no RNG: a resumed run reproduces the
losses of an uninterrupted one exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path

import jax
import optax
import orbax.checkpoint as ocp
from tqdm.auto import tqdm

from vipllava_jax import hub, storage
from vipllava_jax.processing.captions import image_preprocessor
from vipllava_jax.processing.processor import VipLlavaProcessor
from vipllava_jax.registry import family_of
from vipllava_jax.train.checkpoints import (
    checkpoint_manager,
    data_state,
    host_data_state,
    restore_latest,
    set_aside,
)
from vipllava_jax.train.config import RunConfig, TrainingError
from vipllava_jax.train.data import CaptionDataLoader, LoaderOptions, RecordLoader, TrainDataLoader
from vipllava_jax.train.export import RUN_CONFIG
from vipllava_jax.train.flops import device_peak_tflops, train_flops_per_token
from vipllava_jax.train.hosts import check_joined, explicit_settings, run_lock, topology
from vipllava_jax.train.mesh import mesh_from_spec, shard_batch
from vipllava_jax.train.step import init_train_state, make_train_step


def _prepare_output(cfg: RunConfig):
    """The output folder carries the model config and tokenizer files, so that a training
    checkpoint converts back to HF on its own (`vipllava-convert orbax-to-hf OUTPUT_DIR`).
    A Path, or an epath.Path for a gs:// output_dir."""
    out = storage.path(cfg.output_dir)
    if jax.process_index() != 0:  # one writer when several processes share the folder
        return out
    for f in storage.path(cfg.model).iterdir():
        if f.suffix in (".json", ".txt", ".model") and not f.name.startswith(".") and f.is_file():
            if not (out / f.name).exists():
                storage.copy_file(f, out / f.name)
    (out / RUN_CONFIG).write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
    return out


def train(cfg: RunConfig, *, progress: bool = True) -> list[dict[str, float]]:
    """Runs (or resumes) the training run; returns the metrics of the steps it ran.

    On several hosts every process calls this with the same config, after joining the others
    (`hosts.join_hosts`, which `vipllava-train` calls itself)."""
    settings = explicit_settings(dataclasses.asdict(cfg))
    check_joined(settings["num_processes"] if settings else 1)
    cfg = dataclasses.replace(cfg, model=str(hub.resolve(cfg.model)))  # a hub id: its cached snapshot
    if not storage.is_remote(cfg.output_dir):  # a bucket has no folders to create
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    with run_lock(cfg.output_dir):
        return _train(cfg, progress=progress)


class Interrupted(TrainingError):
    """The run was stopped by SIGINT (Ctrl-C) after a completed step; its state was saved."""


def _train(cfg: RunConfig, *, progress: bool) -> list[dict[str, float]]:
    try:  # before anything else: a mesh the devices cannot hold is a config error
        mesh = mesh_from_spec(cfg.mesh)
    except ValueError as e:
        raise TrainingError(f"mesh: {e}") from None
    out = _prepare_output(cfg)
    model = family_of(cfg.model).model_class.from_pretrained(
        cfg.model, dtype=cfg.dtype, param_dtype=cfg.param_dtype, mesh=mesh)  # every process its shards
    # batch_size is the global batch; each process loads its share of the rows
    hosts, primary = jax.process_count(), jax.process_index() == 0
    if cfg.batch_size % hosts:
        raise TrainingError(f"batch_size {cfg.batch_size} is not a multiple of the {hosts} processes")
    say = tqdm.write if progress and primary else (lambda _: None)
    if progress:  # every process says where it stands
        tqdm.write(topology(mesh, cfg.batch_size))
    loader = data_loader(cfg, model.config, batch_size=cfg.batch_size // hosts)
    model_config = model.config
    graphdef, state, shardings = init_train_state(model, cfg.train, mesh)
    del model
    step_fn = make_train_step(graphdef, cfg.train, mesh, shardings)
    # One more than `keep`: the newest checkpoint is not vouched for until the next step's
    # loss (computed on its parameters) is finite; `keep` of them have been.
    manager = checkpoint_manager(out, cfg.keep + 1)
    start, state, saved_data, skipped = restore_latest(manager, state, shardings)
    for bad, why in skipped:
        say(f"skipped checkpoint {bad} (it does not restore: {why}); moved to "
            f"{out / 'checkpoints.damaged' / str(bad)}")
    if start is not None:
        loader.load_state_dict(host_data_state(saved_data))
        say(f"resumed from step {start} ({manager.directory / str(start)})")
    start = start or 0
    if primary:
        _drop_metrics_after(out / "metrics.jsonl", start)
    flops_per_token = train_flops_per_token(state, model_config, seq_len=cfg.max_length)
    peak = cfg.peak_tflops or device_peak_tflops(jax.devices()[0])
    if peak is None and primary:
        tqdm.write(f"MFU not estimated: no peak TFLOP/s known for {jax.devices()[0].device_kind!r} "
                   "(set peak_tflops in the config)")
    peak_total = None if peak is None else peak * jax.device_count()
    board = _tensorboard(out) if primary and cfg.tensorboard else None

    def save(step):
        manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state(loader)),
        ))

    history = []
    last = cfg.steps if cfg.stop_after is None else min(cfg.steps, cfg.stop_after)
    batches = iter(loader)
    bar = tqdm(total=cfg.steps, initial=start, desc="train", unit="step", disable=not (progress and primary))
    # metrics are global (the step reduces over all processes): process 0 writes them
    with (_MetricsLog(out / "metrics.jsonl") if primary else contextlib.nullcontext() as log,
          _sigint_flag() as interrupted):
        try:
            for step in range(start + 1, last + 1):
                t0 = time.perf_counter()
                state, metrics = step_fn(state, shard_batch(next(batches), mesh))
                metrics = {k: float(v) for k, v in metrics.items()}  # waits for the step
                seconds = time.perf_counter() - t0
                if not (math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])):
                    _stop_non_finite(manager, step, metrics)
                seq_tokens = cfg.batch_size * cfg.max_length  # every position costs compute
                metrics.update(step=step, seconds=seconds, tokens_per_s=seq_tokens / seconds,
                               model_tflops=seq_tokens * flops_per_token / seconds / 1e12,
                               **{f"data_{k}": v for k, v in loader.stats.items()})
                if peak_total is not None:
                    metrics["mfu"] = metrics["model_tflops"] / peak_total
                history.append(metrics)
                if primary:
                    log.write(json.dumps(metrics) + "\n")
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
                final = step == cfg.steps or interrupted()
                if final:  # no next step vouches for these parameters: check them directly
                    _check_params(state, step, manager)
                if step % cfg.save_every == 0 or final:
                    save(step)
                    if primary:
                        log.sync()  # a bucket's metrics.jsonl: written whole with each checkpoint
                if interrupted():
                    manager.wait_until_finished()
                    raise Interrupted(f"interrupted after step {step}; saved checkpoint {step} in "
                                      f"{manager.directory} (run the same command to resume)")
        finally:
            bar.close()
            if board is not None:
                _close_board(board)
            manager.wait_until_finished()  # a save in flight completes, whatever stopped the run
    _prune(manager, cfg.keep)
    manager.close()
    return history


def _stop_non_finite(manager, step: int, metrics: dict[str, float]) -> None:
    """Step `step`'s loss or gradient is not finite: the parameters it was computed on (those
    of step - 1) are not resumable either; their checkpoint, if saved, is set aside."""
    manager.wait_until_finished()
    moved = ""
    if step - 1 in manager.all_steps():
        moved = f"; checkpoint {step - 1}, whose parameters gave it, moved to " \
                f"{set_aside(manager, step - 1, 'nonfinite')}"
    good = manager.latest_step()
    good = f"step {good}" if good is not None else "none (no checkpoint before it is left)"
    raise TrainingError(
        f"loss is {metrics['loss']} (grad_norm {metrics['grad_norm']}) at step {step}; stopped "
        f"without saving it{moved}. The last good checkpoint is {good}"
    )


def _check_params(state, step: int, manager) -> None:
    if not math.isfinite(float(optax.global_norm(state.params))):
        manager.wait_until_finished()
        good = manager.latest_step()
        raise TrainingError(f"the parameters after step {step} are not finite; stopped without "
                            f"saving them. The last good checkpoint is step {good}")


def _prune(manager, keep: int) -> None:
    """Down to the newest `keep` checkpoints, once the run ended well (the extra one kept
    while the newest was not yet vouched for goes)."""
    for old in sorted(manager.all_steps())[:-keep]:
        manager.delete(old)


class _MetricsLog:
    """metrics.jsonl, one JSON row a step. Locally appended and flushed row by row. An object
    store cannot append: for a gs:// output_dir the rows are kept in memory and the whole
    object (its earlier rows included) is written at `sync` (each checkpoint save) and when
    the run stops, for whatever reason (a single object write is atomic on GCS)."""

    def __init__(self, path):
        self.path = path
        self.remote = storage.is_remote(path)
        if self.remote:
            old = storage.read_text(path) if path.exists() else ""
            if old and not old.endswith("\n"):
                old += "\n"
            self.rows = [old] if old else []
            self.written = len(self.rows)
        else:
            self.file = open(path, "a")

    def write(self, row: str) -> None:
        if self.remote:
            self.rows.append(row)
        else:
            self.file.write(row)
            self.file.flush()

    def sync(self) -> None:
        if self.remote and len(self.rows) != self.written:
            storage.write_text(self.path, "".join(self.rows))
            self.written = len(self.rows)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if not self.remote:
            self.file.close()
            return
        try:
            self.sync()
        except Exception as e:  # noqa: BLE001 - a failed upload must not hide why the run stopped
            if exc_type is None:
                raise
            print(f"could not write {os.fspath(self.path)}: {type(e).__name__}: {e}", file=sys.stderr)


def _drop_metrics_after(path, step: int) -> None:
    """A resumed run logs again the steps after its checkpoint: their old rows go (the file is
    rewritten whole, then renamed over the old one; on a bucket, written whole: one object
    write is atomic)."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    keep = []
    for line in lines:
        try:
            row_step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by a killed run
        if row_step <= step:
            keep.append(line if line.endswith("\n") else line + "\n")
    if keep != lines and storage.is_remote(path):
        path.write_text("".join(keep))
    elif keep != lines:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(keep))
        tmp.replace(path)


@contextlib.contextmanager
def _sigint_flag():
    """While inside, the first SIGINT (Ctrl-C) only sets a flag that the loop reads after each
    step (it then saves and stops); a second one interrupts at once. Only in the main thread,
    where Python runs signal handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    hit = threading.Event()
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum, frame):
        hit.set()
        signal.signal(signal.SIGINT, previous)

    signal.signal(signal.SIGINT, handler)
    try:
        yield hit.is_set
    finally:
        signal.signal(signal.SIGINT, previous)


def validate_data(cfg: RunConfig) -> tuple[int, list[str]]:
    """`RecordLoader.validate` on the run's data, with the run's model config and processor
    (no weights loaded, no devices used)."""
    cfg = dataclasses.replace(cfg, model=str(hub.resolve(cfg.model)))
    model_config = family_of(cfg.model).config_class.from_pretrained(cfg.model)
    return data_loader(dataclasses.replace(cfg, num_workers=0), model_config, batch_size=1).validate()


def data_loader(cfg: RunConfig, model_config, batch_size: int) -> RecordLoader:
    """LLaVA conversations for VipLlava; image-caption pairs for an encoder-decoder."""
    options = LoaderOptions(batch_size=batch_size, max_length=cfg.max_length, seed=cfg.seed, strict=cfg.strict,
                            num_workers=cfg.num_workers, worker_type=cfg.worker_type)
    if family_of(cfg.model).data == "captions":
        from transformers import AutoTokenizer  # (slow to import: only for caption runs)

        eos = model_config.eos_token_id if model_config.eos_token_id is not None else model_config.decoder.eos_token_id
        if isinstance(eos, list):
            eos = eos[0]
        if eos is None:
            raise TrainingError(f"{cfg.model}: the config has no eos_token_id to end captions with")
        return CaptionDataLoader(
            cfg.data, cfg.image_folder, AutoTokenizer.from_pretrained(cfg.model),
            image_preprocessor(cfg.model, model_config.encoder.image_hw), options, eos_token_id=eos)
    processor = VipLlavaProcessor.from_pretrained(cfg.model, pad_to_square=cfg.image_aspect_ratio == "pad")
    return TrainDataLoader(cfg.data, cfg.image_folder, processor, options, template=cfg.template)


def _tensorboard(out):
    from tensorboardX import SummaryWriter  # imported here: only the primary process writes

    # a gs:// URL too: tensorboardX writes it through google-cloud-storage itself
    return SummaryWriter(os.fspath(out / "tensorboard"))


def _close_board(board) -> None:
    """Closes the TensorBoard writer. On gs://, tensorboardX's record writer uploads its whole
    buffer again each time it is closed, and once more when it is garbage-collected, which its
    atexit hook delays to interpreter exit (then retried for minutes if the bucket is
    unreachable): once closed, everything is uploaded, so its later closes are made no-ops."""
    files = list((board.all_writers or {}).values())
    board.close()
    for f in files:
        events = getattr(getattr(f, "event_writer", None), "_ev_writer", None)
        writer = getattr(getattr(events, "_py_recordio_writer", None), "_writer", None)
        if type(writer).__name__ == "GCSRecordWriter":
            writer.close = lambda: None
