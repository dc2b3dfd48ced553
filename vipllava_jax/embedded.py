"""Where the files shipped inside the package are: the embedded tiny model, its test split and
the demo image (the defaults of vipllava-demo, vipllava-generate and vipllava-eval)."""

from pathlib import Path

ASSETS = Path(__file__).parent / "assets"
EMBEDDED_MODEL = ASSETS / "tiny_vipllava" / "model"  # an Orbax folder with its tokenizer
EMBEDDED_TEST_SPLIT = ASSETS / "tiny_vipllava" / "test" / "test.jsonl"  # its images beside it
DEMO_IMAGE = ASSETS / "demo.png"
