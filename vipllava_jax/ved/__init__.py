"""VisionEncoderDecoder (ViT/DeiT encoder + GPT-2 / BERT decoder) in Flax NNX."""
