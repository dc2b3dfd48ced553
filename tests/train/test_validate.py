"""`vipllava-train --validate`: every record loaded once before a run, the unusable ones listed
with their lines (a strict run would otherwise find a bad image only when it reaches it)."""

from __future__ import annotations

import json
import shutil

from vipllava_jax.train.cli import main


def config(workspace, tmp_path, data):
    path = tmp_path / "run.toml"
    path.write_text(f'model = "{workspace / "model"}"\ndata = "{data}"\nimage_folder = "{workspace / "images"}"\n'
                    f'output_dir = "{tmp_path / "run"}"\nbatch_size = 2\nmax_length = 64\ndtype = "float32"\n')
    return path


def test_validate_lists_the_records_a_run_would_skip(workspace, tmp_path, capsys):
    assert main(["--config", str(config(workspace, tmp_path, workspace / "data.jsonl")), "--validate"]) == 0
    assert capsys.readouterr().out.strip().endswith("8 usable records, 0 a run would skip")

    lines = (workspace / "data.jsonl").read_text().splitlines()
    bad = json.loads(lines[2])
    bad["image"] = "missing.png"
    lines[2] = json.dumps(bad)
    lines[5] = '{"id": "broken", '
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(lines) + "\n")
    assert main(["--config", str(config(workspace, tmp_path, data)), "--validate"]) == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == "6 usable records, 2 a run would skip", out
    assert len(out) == 3 and "line 3: bad_image" in out[0] and "line 6: bad_json" in out[1], out
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())  # nothing trained
    shutil.rmtree(tmp_path / "run", ignore_errors=True)
