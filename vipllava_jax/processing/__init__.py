"""From user inputs to model inputs: images (images.py), VipLlava's processor (processor.py),
prompt templates (prompts.py), visual-prompt markers (visual_prompts.py, canvas.py) and the
VisionEncoderDecoder captioners' image preprocessing (captions.py)."""
