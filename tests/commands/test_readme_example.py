"""README.md's CPU fine-tuning example runs as written: the two commands of its Fine-tuning
section, from a folder laid out as the repository root."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def readme_commands() -> list[str]:
    section = ROOT.joinpath("README.md").read_text().split("## Fine-tuning", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


@pytest.mark.slow
def test_the_readme_fine_tuning_example_runs_as_written(tmp_path):
    commands = readme_commands()
    assert commands[0] == "vipllava-train --config examples/finetune_cpu.toml", commands
    for name in ("vipllava_jax", "examples"):  # the repository root's layout, outputs in tmp
        (tmp_path / name).symlink_to(ROOT / name)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    for command in commands:
        out = subprocess.run(shlex.split(command), cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=600)
        assert out.returncode == 0, (command, out.stderr[-3000:])
    rows = [json.loads(line) for line in (tmp_path / "runs/finetune_cpu/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 21))
    assert (tmp_path / "runs/finetune_cpu-hf/config.json").is_file()
