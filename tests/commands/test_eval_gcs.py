"""vipllava-eval with its question set, images and answers file in a bucket (the local GCS
emulator): the answers file of the local run, written whole at the end; --out checked first."""

from __future__ import annotations

import json

from vipllava_jax import storage
from vipllava_jax.embedded import EMBEDDED_MODEL, EMBEDDED_TEST_SPLIT
from vipllava_jax.evaluation.cli import main

LIMIT = 4
FLAGS = ["--model", str(EMBEDDED_MODEL), "--limit", str(LIMIT), "--batch-size", str(LIMIT),
         "--max-new-tokens", "3", "--no-progress"]


def test_eval_on_a_bucket_writes_the_answers_of_the_local_run(tmp_path, gcs_bucket, capsys):
    records = EMBEDDED_TEST_SPLIT.read_text().splitlines()[:LIMIT]
    bucket = storage.path(gcs_bucket)
    (bucket / "questions" / "test.jsonl").write_text("\n".join(records) + "\n")
    for line in records:  # the images under another folder: --image-folder
        image = json.loads(line)["image"]
        (bucket / "pictures" / image).write_bytes((EMBEDDED_TEST_SPLIT.parent / image).read_bytes())

    local_out = tmp_path / "answers.jsonl"
    assert main([*FLAGS, "--data", str(EMBEDDED_TEST_SPLIT), "--out", str(local_out)]) == 0
    remote_out = bucket / "runs" / "eval" / "answers.jsonl"
    assert main([*FLAGS, "--data", f"{gcs_bucket}/questions/test.jsonl", "--image-folder",
                 f"{gcs_bucket}/pictures", "--out", str(remote_out)]) == 0
    out = capsys.readouterr().out
    assert f"predictions -> {remote_out}" in out
    assert remote_out.read_text() == local_out.read_text()
    assert len(local_out.read_text().splitlines()) == LIMIT


def test_a_bucket_out_is_checked_before_any_work_and_written_only_at_the_end(gcs_bucket, capsys):
    bucket = storage.path(gcs_bucket)
    (bucket / "runs" / "old.jsonl").write_text("{}\n")
    for out, message in [(f"{gcs_bucket}/runs", "is a folder"), (gcs_bucket, "is a folder"),
                         ("gs://no-such-bucket-for-eval/a.jsonl", "no bucket")]:
        assert main(["--out", out, "--no-progress"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err

    (bucket / "bad.jsonl").write_text(json.dumps({"conversations": []}) + "\n")  # no image
    out = bucket / "never.jsonl"
    assert main(["--data", f"{gcs_bucket}/bad.jsonl", "--out", str(out), "--no-progress"]) == 2
    assert "record 0: needs an image" in capsys.readouterr().err
    assert not out.exists()
