"""The Swin image encoder of a VisionEncoderDecoder model (and Donut's `donut-swin`: the same
without the final layernorm).

    pixel_values [B, C, H, W] --patch conv (pixels zero-padded to a patch multiple), norm
    (+ absolute positions when configured)--> [B, h*w, D] --stage i: blocks at width D * 2**i,
    then (all but the last stage) patch merging: 2x2 neighbours concatenated, norm, reduction
    4D -> 2D--> layernorm --> [B, S, D * 2**(stages - 1)]

    block: x = x + attn(LN(x)) within ws x ws windows (padded to a window multiple; every odd
      block's windows cyclically shifted by ws // 2, the wrapped-around regions masked with
      -100), each head's scores plus a relative position bias from a `[(2ws-1)**2, N]` table;
      then x = x + mlp(LN(x))

A stage whose grid is no larger than the window attends it as one unshifted window, as
transformers does. Parameter paths equal the keys transformers writes
(`encoder.layers.i.blocks.j.attention.self.query`, `downsample.reduction`, ...).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vipllava_jax.models.ved.config import ViTConfig
from vipllava_jax.models.ved.encoder import ViTDense, ViTPatchEmbeddings
from vipllava_jax.models.ved.layers import ved_activation
from vipllava_jax.nn.layers import DType, LayerNorm, linear

MASKED = -100.0  # transformers' score offset for shifted-window pairs from different regions


def window_index(ws: int) -> np.ndarray:
    """Each window pair's row of the bias table, int `[ws*ws, ws*ws]` (Swin's relative_position_index)."""
    coords = np.stack(np.meshgrid(np.arange(ws), np.arange(ws), indexing="ij")).reshape(2, -1)
    rel = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0) + (ws - 1)
    return rel[:, :, 0] * (2 * ws - 1) + rel[:, :, 1]


def _partition(x: jax.Array, ws: int) -> jax.Array:
    """[B, H, W, C] -> windows [B * nW, ws*ws, C] (row-major windows, as window_partition)."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // ws, ws, w // ws, ws, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, ws * ws, c)


def _reverse(windows: jax.Array, ws: int, b: int, h: int, w: int) -> jax.Array:
    c = windows.shape[-1]
    x = windows.reshape(b, h // ws, w // ws, ws, ws, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h, w, c)


def shift_mask(h: int, w: int, ws: int, shift: int) -> np.ndarray:
    """float32 `[nW, ws*ws, ws*ws]`: 0 within a region of the shifted grid, -100 across."""
    hr = (np.arange(h) >= h - ws).astype(int) + (np.arange(h) >= h - shift)
    wr = (np.arange(w) >= w - ws).astype(int) + (np.arange(w) >= w - shift)
    region = (hr[:, None] * 3 + wr[None, :]).reshape(h // ws, ws, w // ws, ws).transpose(0, 2, 1, 3)
    region = region.reshape(-1, ws * ws)
    return np.where(region[:, None, :] != region[:, :, None], MASKED, 0.0).astype(np.float32)


class SwinSelfAttention(nnx.Module):
    def __init__(self, cfg: ViTConfig, dim: int, heads: int, *, dtype: DType, param_dtype: DType, rngs: nnx.Rngs):
        kw = dict(bias=cfg.qkv_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        ws = cfg.window_size
        self.query = linear(dim, dim, ("embed", "heads"), **kw)
        self.key = linear(dim, dim, ("embed", "heads"), **kw)
        self.value = linear(dim, dim, ("embed", "heads"), **kw)
        self.relative_position_bias_table = nnx.Param(jnp.zeros(((2 * ws - 1) ** 2, heads), param_dtype),
                                                      out_sharding=(None, None))


class SwinAttention(nnx.Module):
    def __init__(self, cfg: ViTConfig, dim: int, heads: int, *, dtype: DType, param_dtype: DType, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.num_heads, self.head_dim = heads, dim // heads
        self.self = SwinSelfAttention(cfg, dim, heads, **kw)
        self.output = ViTDense(dim, dim, ("heads", "embed"), **kw)

    def __call__(self, windows: jax.Array, ws: int, batch: int, mask: np.ndarray | None) -> jax.Array:
        """windows `[B * nW, T, C]` (T = ws*ws) -> `[B * nW, T, C]`."""
        r, t, _ = windows.shape
        split = lambda y: y.reshape(r, t, self.num_heads, self.head_dim)
        p = self.self
        q, k, v = split(p.query(windows)), split(p.key(windows)), split(p.value(windows))
        scores = jnp.einsum("btnh,bsnh->bnts", q, k, preferred_element_type=jnp.float32) * self.head_dim**-0.5
        index = window_index(ws)
        scores = scores + jnp.transpose(p.relative_position_bias_table[...].astype(jnp.float32)[index], (2, 0, 1))
        if mask is not None:  # [nW, T, T], the same for every image
            scores = (scores.reshape(batch, -1, self.num_heads, t, t) + jnp.asarray(mask)[None, :, None]).reshape(
                r, self.num_heads, t, t)
        weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        return self.output.dense(jnp.einsum("bnts,bsnh->btnh", weights, v).reshape(r, t, -1))


class SwinLayer(nnx.Module):
    def __init__(self, cfg: ViTConfig, dim: int, heads: int, shift: int, *, dtype: DType, param_dtype: DType,
                 rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        norm = dict(eps=cfg.layer_norm_eps, dtype=dtype, param_dtype=param_dtype)
        hidden = int(cfg.mlp_ratio * dim)
        self.window, self.shift = cfg.window_size, shift
        self.act = ved_activation(cfg.hidden_act)
        self.layernorm_before = LayerNorm(dim, **norm)
        self.attention = SwinAttention(cfg, dim, heads, **kw)
        self.layernorm_after = LayerNorm(dim, **norm)
        self.intermediate = ViTDense(dim, hidden, ("embed", "mlp"), **kw)
        self.output = ViTDense(hidden, dim, ("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array, hw: tuple[int, int]) -> jax.Array:
        h, w = hw
        b, _, c = x.shape
        ws, shift = self.window, self.shift
        if min(h, w) <= ws:  # the grid fits one window: no shift (transformers' set_shift_and_window_size)
            ws, shift = min(h, w), 0
        y = self.layernorm_before(x).reshape(b, h, w, c)
        pad_b, pad_r = (ws - h % ws) % ws, (ws - w % ws) % ws
        y = jnp.pad(y, ((0, 0), (0, pad_b), (0, pad_r), (0, 0)))
        hp, wp = h + pad_b, w + pad_r
        if shift:
            y = jnp.roll(y, (-shift, -shift), axis=(1, 2))
        out = self.attention(_partition(y, ws), ws, b, shift_mask(hp, wp, ws, shift) if shift else None)
        y = _reverse(out, ws, b, hp, wp)
        if shift:
            y = jnp.roll(y, (shift, shift), axis=(1, 2))
        x = x + y[:, :h, :w].reshape(b, h * w, c)
        return x + self.output.dense(self.act(self.intermediate.dense(self.layernorm_after(x))))


class SwinPatchMerging(nnx.Module):
    def __init__(self, dim: int, *, dtype: DType, param_dtype: DType, rngs: nnx.Rngs):
        self.reduction = linear(4 * dim, 2 * dim, ("mlp", "embed"), bias=False, dtype=dtype, param_dtype=param_dtype,
                                rngs=rngs)
        self.norm = LayerNorm(4 * dim, eps=1e-5, dtype=dtype, param_dtype=param_dtype)  # nn.LayerNorm's default

    def __call__(self, x: jax.Array, hw: tuple[int, int]) -> jax.Array:
        h, w = hw
        b, _, c = x.shape
        x = jnp.pad(x.reshape(b, h, w, c), ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
        x = jnp.concatenate([x[:, row::2, col::2] for col in range(2) for row in range(2)], axis=-1)
        return self.reduction(self.norm(x.reshape(b, -1, 4 * c)))


class SwinStage(nnx.Module):
    def __init__(self, cfg: ViTConfig, i: int, *, dtype: DType, param_dtype: DType, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        dim = cfg.embed_dim * 2**i
        self.blocks = nnx.List([
            SwinLayer(cfg, dim, cfg.num_heads[i], 0 if j % 2 == 0 else cfg.window_size // 2, **kw)
            for j in range(cfg.depths[i])
        ])
        self.downsample = SwinPatchMerging(dim, **kw) if i < len(cfg.depths) - 1 else None


class SwinEncoder(nnx.Module):
    def __init__(self, cfg: ViTConfig, *, dtype: DType, param_dtype: DType, rngs: nnx.Rngs):
        self.layers = nnx.List([
            SwinStage(cfg, i, dtype=dtype, param_dtype=param_dtype, rngs=rngs) for i in range(len(cfg.depths))
        ])


class SwinEmbeddings(nnx.Module):
    def __init__(self, cfg: ViTConfig, *, dtype: DType, param_dtype: DType, rngs: nnx.Rngs):
        self.dtype, self.patch = dtype, cfg.patch_size
        gh, gw = cfg.patch_grid  # as transformers sizes it (no padding counted)
        self.patch_embeddings = ViTPatchEmbeddings(dataclasses.replace(cfg, hidden_size=cfg.embed_dim),
                                                   dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm = LayerNorm(cfg.embed_dim, eps=1e-5, dtype=dtype, param_dtype=param_dtype)
        self.position_embeddings = nnx.Param(
            nnx.initializers.normal(0.02)(rngs.params(), (1, gh * gw, cfg.embed_dim), param_dtype),
            out_sharding=(None, "seq", "embed"),
        ) if cfg.use_absolute_embeddings else None

    def __call__(self, pixel_values: jax.Array) -> tuple[jax.Array, tuple[int, int]]:
        x = jnp.transpose(pixel_values, (0, 2, 3, 1)).astype(self.dtype)  # [B, H, W, C]
        _, h, w, _ = x.shape
        x = jnp.pad(x, ((0, 0), (0, (-h) % self.patch), (0, (-w) % self.patch), (0, 0)))
        hw = (x.shape[1] // self.patch, x.shape[2] // self.patch)
        x = self.norm(self.patch_embeddings(x))
        if self.position_embeddings is not None:
            x = x + self.position_embeddings[...].astype(self.dtype)
        return x, hw


class SwinModel(nnx.Module):
    """embeddings -> stages -> layernorm: the last hidden state `[B, S, D * 2**(stages-1)]`."""

    def __init__(self, cfg: ViTConfig, *, dtype: DType, param_dtype: DType, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.config = cfg
        self.embeddings = SwinEmbeddings(cfg, **kw)
        self.encoder = SwinEncoder(cfg, **kw)
        self.layernorm = None if cfg.model_type == "donut-swin" else LayerNorm(  # Donut's has none
            cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        x, hw = self.embeddings(pixel_values)
        for stage in self.encoder.layers:
            for block in stage.blocks:
                x = block(x, hw)
            if stage.downsample is not None:
                x = stage.downsample(x, hw)
                hw = ((hw[0] + 1) // 2, (hw[1] + 1) // 2)
        return x if self.layernorm is None else self.layernorm(x)
