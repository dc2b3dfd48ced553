import sys

from vipllava_jax.convert.cli import main

sys.exit(main())
