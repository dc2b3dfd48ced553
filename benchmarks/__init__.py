"""Speed and memory benchmarks, run as modules from the repository root (`python -m
benchmarks.train --help`); benchmarks/gpu.sh runs the GPU set on a lent device."""
