"""Layers every model family shares: norms, RoPE, attention (dense, KeyLengths, cached, cuDNN,
Pallas), the KV cache, token losses, sampling and the logical-axis sharding rules."""
