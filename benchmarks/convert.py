"""Peak memory of `vipllava-convert hf-to-orbax` on a ~1B-parameter bfloat16 checkpoint.

    .venv/bin/python -m benchmarks.convert [--workdir DIR [--keep] [--reuse]] [--text-layers 12]

Writes a random VipLlava checkpoint in transformers' 5.x layout (CLIP ViT-L/14-336 tower, a
Llama decoder of hidden 2048 and `--text-layers` layers, vocabulary 32064; sharded
safetensors, bfloat16) straight from numpy, one tensor at a time: no torch model of that size
is built. The tensor names and shapes come from our abstract model and the mapping table, so
they are exactly what the converter expects. Then runs the installed console script in a
subprocess and reports its peak resident memory against the checkpoint's size (target: at most
1.5x), and the wall time. Finally prints the parameter counts of the 7B and 13B models, ours
(`jax.eval_shape`) against transformers' (meta device). Exits 1 if the ratio is over target
or the counts differ.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import ml_dtypes
import numpy as np

GIB = 2**30


def vip_llava_config(size: str) -> dict:
    """config.json of llava-hf/vip-llava-{7b,13b}-hf ("1b": the benchmark's smaller decoder)."""
    hidden, layers, heads, inter = {
        "7b": (4096, 32, 32, 11008), "13b": (5120, 40, 40, 13824), "1b": (2048, 12, 16, 5632),
    }[size]
    return {
        "model_type": "vipllava",
        "image_token_index": 32000,
        "projector_layernorm_eps": 1e-5,
        "vision_feature_layer": [-2, -5, -8, -11, 6],
        "dtype": "bfloat16",
        "vision_config": {
            "model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096,
            "num_hidden_layers": 24, "num_attention_heads": 16, "image_size": 336,
            "patch_size": 14, "projection_dim": 768,
        },
        "text_config": {
            "model_type": "llama", "hidden_size": hidden, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": heads,
            "intermediate_size": inter, "vocab_size": 32064, "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-5, "pad_token_id": 0,
        },
    }


class RandomTensor:
    """Stands in for one parameter of ours: shape and dtype now, random values on demand."""

    def __init__(self, shape, seed: int):
        self.shape, self.ndim, self.seed = tuple(shape), len(shape), seed
        self.dtype = np.dtype(ml_dtypes.bfloat16)

    def __array__(self, dtype=None, copy=None):
        values = np.random.default_rng(self.seed).standard_normal(self.shape, np.float32) * 0.02
        return values.astype(dtype or self.dtype)


def write_checkpoint(folder: Path, config: dict, max_shard_bytes: int) -> tuple[int, int]:
    """Writes config.json and sharded bf16 safetensors; returns (parameters, bytes of weights)."""
    import jax
    from flax import nnx

    from vipllava_jax.checkpoint.hf import write_hf_params
    from vipllava_jax.models.vipllava.config import VipLlavaConfig
    from vipllava_jax.models.vipllava.mapping import VIPLLAVA
    from vipllava_jax.models.vipllava.modeling import VipLlavaForConditionalGeneration

    cfg = VipLlavaConfig.from_hf_dict(config)
    state = nnx.state(VipLlavaForConditionalGeneration.abstract(cfg, param_dtype="bfloat16"), nnx.Param)
    params = {
        ".".join(map(str, path)): RandomTensor(var.get_value().shape, seed)
        for seed, (path, var) in enumerate(nnx.to_flat_state(state))
    }
    folder.mkdir(parents=True)
    write_hf_params(params, folder, max_shard_bytes=max_shard_bytes, progress=True, mapping=VIPLLAVA)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state))
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    return n, size


def peak_rss_of(cmd: list[str]) -> tuple[int, float, subprocess.CompletedProcess]:
    """Runs `cmd`; returns (peak RSS in bytes, seconds, result).

    Peak RSS is the kernel's high-water mark of the child (VmHWM), polled while it runs.
    getrusage's ru_maxrss is no use here: a child started by vfork carries its parent's high
    mark across exec, so it would report this process's own peak. Samples taken before the
    exec (when the child's command line is still ours) are ignored for the same reason.
    """
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    want = "\0".join(cmd).encode()
    hwm = [0]

    def poll():
        proc_dir = Path(f"/proc/{proc.pid}")
        while proc.poll() is None:
            try:
                if proc_dir.joinpath("cmdline").read_bytes().rstrip(b"\0").endswith(want):
                    for line in proc_dir.joinpath("status").read_text().splitlines():
                        if line.startswith("VmHWM:"):
                            hwm[0] = max(hwm[0], int(line.split()[1]) * 1024)
            except (FileNotFoundError, ProcessLookupError):
                break
            time.sleep(0.01)

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    out, err = proc.communicate()
    seconds = time.perf_counter() - start
    watcher.join()
    return hwm[0], seconds, subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def full_size_counts() -> bool:
    import jax
    import torch
    import transformers
    from flax import nnx

    from vipllava_jax.models.vipllava.config import VipLlavaConfig
    from vipllava_jax.models.vipllava.modeling import VipLlavaForConditionalGeneration

    same = True
    for size in ("7b", "13b"):
        d = {**vip_llava_config(size), "dtype": "float16"}
        start = time.perf_counter()
        abstract = VipLlavaForConditionalGeneration.abstract(VipLlavaConfig.from_hf_dict(d))
        ours = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
        t_ours = time.perf_counter() - start
        start = time.perf_counter()
        with torch.device("meta"):
            hf = transformers.VipLlavaForConditionalGeneration(transformers.VipLlavaConfig.from_dict(d))
        theirs = sum(p.numel() for p in hf.parameters())
        t_hf = time.perf_counter() - start
        verdict = "equal" if ours == theirs else "DIFFERENT"
        print(f"vip-llava-{size}: ours {ours:,} ({t_ours:.1f} s, eval_shape), transformers {theirs:,} "
              f"({t_hf:.1f} s, meta device): {verdict}")
        same = same and ours == theirs
    return same


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=None, help="where to write (default: a temp dir)")
    parser.add_argument("--text-layers", type=int, default=12, help="decoder layers (12: ~1.07B parameters)")
    parser.add_argument("--shard-gib", type=float, default=1.0, help="safetensors shard size of the source")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints")
    parser.add_argument("--reuse", action="store_true", help="reuse the source kept in --workdir")
    parser.add_argument("--skip-full-size", action="store_true", help="skip the 7B / 13B counts")
    args = parser.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="vipllava-bench-"))
    src, dst = work / "hf", work / "orbax"
    reuse = args.reuse and (src / "config.json").is_file()
    if not reuse:
        shutil.rmtree(src, ignore_errors=True)
    shutil.rmtree(dst, ignore_errors=True)
    exe = Path(sys.executable).with_name("vipllava-convert")
    ok = True
    try:
        start = time.perf_counter()
        if reuse:
            size = sum(f.stat().st_size for f in src.glob("*.safetensors"))
            n = "?"
        else:
            config = vip_llava_config("1b")
            config["text_config"]["num_hidden_layers"] = args.text_layers
            n, size = write_checkpoint(src, config, int(args.shard_gib * GIB))
            n = f"{n:,}"
        shards = len(list(src.glob("*.safetensors")))
        print(f"checkpoint: {n} parameters, bfloat16, {size / GIB:.2f} GiB in {shards} shard(s), "
              f"{'reused' if reuse else 'written'} in {time.perf_counter() - start:.1f} s")

        # What the interpreter and libraries alone take, for context.
        base, _, _ = peak_rss_of([sys.executable, "-c", "import vipllava_jax.checkpoint, vipllava_jax.models.vipllava.modeling"])
        peak, seconds, result = peak_rss_of([str(exe), "hf-to-orbax", str(src), str(dst)])
        if result.returncode != 0:
            print(result.stderr, file=sys.stderr)
            return 1
        out_size = sum(f.stat().st_size for f in dst.rglob("*") if f.is_file())
        print(f"vipllava-convert hf-to-orbax: {seconds:.1f} s, peak RSS {peak / GIB:.2f} GiB "
              f"(imports alone: {base / GIB:.2f} GiB), output {out_size / GIB:.2f} GiB")
        ratio = peak / size
        ok = ratio <= 1.5
        print(f"peak RSS / checkpoint size = {ratio:.2f} (target <= 1.5): {'ok' if ok else 'OVER'}")
    finally:
        if not args.keep:
            shutil.rmtree(work if args.workdir is None else src, ignore_errors=True)
            shutil.rmtree(dst, ignore_errors=True)
    if not args.skip_full_size:
        ok = full_size_counts() and ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
