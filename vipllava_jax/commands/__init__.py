"""The user commands that are not a subsystem of their own: `vipllava-generate` (generate.py)
and `vipllava-demo` (demo.py)."""
