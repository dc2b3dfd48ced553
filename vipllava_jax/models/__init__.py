"""Model families, one folder each: `vipllava/` (CLIP tower + projector + Llama/Mistral) and
`ved/` (VisionEncoderDecoder). A family folder holds its config, modules, HF mapping table
and generate; `vipllava_jax.registry` lists the families."""
