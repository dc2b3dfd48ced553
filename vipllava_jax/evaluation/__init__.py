"""`vipllava-eval`: questions about marked images, answered and scored (evaluate.py, cli.py)."""
