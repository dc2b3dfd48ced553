"""The synthetic visual-prompt task: deterministic files, disjoint splits, twins that differ."""

import hashlib
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from tools import synthetic
from tools.synthetic import CATEGORIES, QUESTIONS, Scene, SceneObject, answer, write_dataset


def _digest(folder):
    """Hash of every file under `folder` (names and bytes)."""
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(folder)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def _records(folder, split):
    return [json.loads(line) for line in (folder / f"{split}.jsonl").read_text().splitlines()]


def _object_pixels(pixels):
    """[H, W, 3] -> [H, W] bool: the objects' visible pixels. The scene is achromatic and the
    markers saturated, so they are the grey pixels that are not background."""
    grey = np.all(pixels == pixels[..., :1], axis=-1)
    return grey & np.any(pixels != synthetic.BACKGROUND, axis=-1)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    counts = write_dataset(root / "a", train=30, val=10, test=40, seed=3)
    return root, counts


def test_same_seed_same_files_other_seed_other_files(dataset, tmp_path):
    root, counts = dataset
    assert counts == {"train": 30, "val": 10, "test": 40}
    write_dataset(tmp_path / "b", train=30, val=10, test=40, seed=3)
    assert _digest(root / "a") == _digest(tmp_path / "b")
    write_dataset(tmp_path / "c", train=30, val=10, test=40, seed=4)
    assert _records(root / "a", "test") != _records(tmp_path / "c", "test")


def test_held_out_scenes_are_never_training_scenes(dataset, monkeypatch, tmp_path):
    root, _ = dataset
    # the generator redraws a held-out scene equal to a training one: force a collision
    real = synthetic.random_scene
    first_train = real(np.random.default_rng([0, 0]))
    calls = iter(range(10**6))
    monkeypatch.setattr(synthetic, "random_scene",
                        lambda rng: first_train if next(calls) in (0, 1) else real(rng))
    seen: set = set()
    synthetic.generate_split(tmp_path, "train", 1, 0, seen)  # call 0: the train scene
    records = synthetic.generate_split(tmp_path, "test", 2, 0, seen)  # call 1 collides: redrawn
    assert len(records) == 2 and len(seen) == 2
    # and in the written files: no held-out image equals a training one, scene by scene
    train_images = {(root / "a" / r["image"]).read_bytes() for r in _records(root / "a", "train")}
    for split in ("val", "test"):
        for r in _records(root / "a", split):
            assert (root / "a" / r["image"]).read_bytes() not in train_images


def test_every_test_scene_has_a_twin_marked_elsewhere(dataset):
    root, _ = dataset
    test = _records(root / "a", "test")
    by_id = {r["id"]: r for r in test}
    assert len(test) == 40 and len({r["pair"] for r in test}) == 20
    assert {r["category"] for r in test} == set(CATEGORIES)
    differ = 0
    for r in test:
        twin = by_id[r["twin"]]
        assert twin["twin"] == r["id"] and twin["pair"] == r["pair"]
        assert twin["marked"] != r["marked"]
        assert (twin["marker"], twin["marker_color"], twin["category"]) == (
            r["marker"], r["marker_color"], r["category"])
        assert r["conversations"][0]["value"] == "<image>\n" + QUESTIONS[r["category"]]
        differ += twin["conversations"][1]["value"] != r["conversations"][1]["value"]
    assert differ >= 0.8 * len(test)  # answers differ unless the scene allows no other answer


def test_train_records_ask_all_questions(dataset):
    root, _ = dataset
    for r in _records(root / "a", "train"):
        conv = r["conversations"]
        assert conv[0]["value"].startswith("<image>\n")
        asked = {m["value"].removeprefix("<image>\n") for m in conv[::2]}
        assert asked == set(QUESTIONS.values()) | set(synthetic.AUX_QUESTIONS.values())


def test_answers_follow_the_marked_object():
    objs = tuple(SceneObject(shape, color, (i * 42 + 5, 10, i * 42 + 30, 35)) for i, (shape, color)
                 in enumerate([("circle", "white"), ("square", "black"), ("triangle", "white")]))
    scene = Scene(objs)
    assert [answer(scene, i, "color") for i in range(3)] == ["white", "black", "white"]
    assert [answer(scene, i, "shape") for i in range(3)] == ["circle", "square", "triangle"]
    assert [answer(scene, i, "left") for i in range(3)] == ["none", "circle", "square"]
    assert [answer(scene, i, "right") for i in range(3)] == ["black", "white", "none"]
    assert [answer(scene, i, "count") for i in range(3)] == ["two", "one", "two"]


def test_tokenizer_covers_both_templates_without_unk(dataset):
    from transformers import AutoTokenizer

    from vipllava_jax.processing.prompts import build_prompt

    tok = AutoTokenizer.from_pretrained(dataset[0] / "a" / "tokenizer")
    assert tok.convert_ids_to_tokens(list(range(5))) == ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
    for template in ("vipllava", "llava_v1"):
        for q in QUESTIONS.values():
            for a in (*synthetic.OBJECT_COLORS, *synthetic.SHAPES, "three", "none"):
                ids = tok(build_prompt([(q, a), ("x", None)], template=template))["input_ids"]
                assert ids.count(tok.unk_token_id) == 1, tok.convert_ids_to_tokens(ids)  # the "x"
    assert tok.decode(tok("white###", add_special_tokens=False)["input_ids"]) == "white ###"


def test_markers_are_drawn_at_the_training_canvas_size():
    from vipllava_jax.processing.visual_prompts import VisualPrompt

    assert synthetic.MARKER_CANVAS == 24  # 48 px scenes: lines 2 px wide (1 px on the canvas)
    edge = synthetic.IMAGE_SIZE // synthetic.MARKER_CANVAS
    scene = synthetic.render_scene(Scene((SceneObject("square", "white", (18, 18, 28, 28)),)))
    vp = VisualPrompt(marker="rectangle", box=(17, 17, 29, 29), color="red", style="constant")
    changed = np.any(np.asarray(synthetic.draw_marker(scene, vp)) != np.asarray(scene), axis=-1)
    ys, xs = np.nonzero(changed)
    # the box (17..29) is 8.5..14.5 on the canvas: canvas pixels 8..14, enlarged 16..29
    assert (xs.min(), ys.min()) == (16, 16) and (xs.max(), ys.max()) == (29, 29)
    assert changed[20:28, 16:16 + edge].all() and not changed[20:28, 16 + edge:24].any()
    # a larger image gets the same marker, proportionally (drawn on the canvas, enlarged)
    big = scene.resize((96, 96), 0)
    vp = VisualPrompt(marker="rectangle", box=(34, 34, 58, 58), color="red", style="constant")
    changed = np.any(np.asarray(synthetic.draw_marker(big, vp)) != np.asarray(big), axis=-1)
    assert changed[40:56, 32:32 + 2 * edge].all() and not changed[40:56, 32 + 2 * edge:48].any()


def test_marker_only_records_show_the_marker_without_objects(tmp_path):
    write_dataset(tmp_path, train=4, val=2, test=2, markers=20)
    alone = _records(tmp_path, "markers")
    assert len(alone) == 20 and {r["category"] for r in alone} == {"marker_only"}
    assert {r["marked"] for r in alone} == {0, 1, 2}
    for r in alone:
        pixels = np.asarray(PIL.Image.open(tmp_path / r["image"]).convert("RGB")).astype(int)
        coloured = (pixels.max(-1) - pixels.min(-1)) > 0  # the scene is achromatic: the marker
        assert coloured.any() and not _object_pixels(pixels).any()  # no object pixels at all
        turns = {c["value"].removeprefix("<image>\n"): a["value"]
                 for c, a in zip(r["conversations"][::2], r["conversations"][1::2])}
        assert turns == {synthetic.AUX_QUESTIONS["marker"]: r["marker_color"],
                         synthetic.AUX_QUESTIONS["where"]: synthetic.POSITIONS[r["marked"]]}


def test_object_records_show_one_object_marked_half_of_the_time(tmp_path):
    write_dataset(tmp_path, train=4, val=2, test=2, objects=40)
    single = _records(tmp_path, "objects")
    assert len(single) == 40 and {r["category"] for r in single} == {"object"}
    assert 10 <= sum("marker" in r for r in single) <= 30
    for r in single:
        pixels = np.asarray(PIL.Image.open(tmp_path / r["image"]).convert("RGB")).astype(int)
        coloured = (pixels.max(-1) - pixels.min(-1)) > 0  # the scene is achromatic: the marker
        assert coloured.any() == ("marker" in r)
        turns = {c["value"].removeprefix("<image>\n"): a["value"]
                 for c, a in zip(r["conversations"][::2], r["conversations"][1::2])}
        assert set(turns) == set(synthetic.OBJECT_QUESTIONS.values())
        assert turns[synthetic.OBJECT_QUESTIONS["shape"]] in synthetic.SHAPES
        colour = synthetic.OBJECT_COLORS[turns[synthetic.OBJECT_QUESTIONS["color"]]]
        grey = _object_pixels(pixels)
        assert np.all(pixels[grey] == colour)  # one object, of the answer's colour
        if "marker" not in r:  # all of it in one cell
            cols = np.flatnonzero(grey.any(0))
            assert cols.min() // synthetic.CELL == cols.max() // synthetic.CELL


def _turns(record):
    return {c["value"].removeprefix("<image>\n"): a["value"]
            for c, a in zip(record["conversations"][::2], record["conversations"][1::2])}


def test_warm_up_splits_where_and_color_and_single_objects_mixed_in(tmp_path):
    """make.sh's stages 2-4: "where" asks a single object's shape, colour and
    column; "color" asks only the marked object's colour in marked scenes; `train_objects` and
    `color_objects` make that fraction of the train/color records single objects (the objects
    split's records)."""
    write_dataset(tmp_path, train=60, val=2, test=2, where=12, color=60,
                  train_objects=0.25, color_objects=0.5)
    for r in _records(tmp_path, "where"):
        turns = _turns(r)
        assert r["category"] == "object" and len(turns) == 3
        assert set(turns) == {*synthetic.OBJECT_QUESTIONS.values(), synthetic.OBJECT_WHERE}
        pixels = np.asarray(PIL.Image.open(tmp_path / r["image"]).convert("RGB")).astype(int)
        xs = np.nonzero(_object_pixels(pixels))[1]
        column = synthetic.POSITIONS.index(turns[synthetic.OBJECT_WHERE])
        assert np.all(xs // synthetic.CELL == column)  # its visible pixels, in that column
    color = _records(tmp_path, "color")
    single = [r for r in color if r["category"] == "object"]
    assert 15 <= len(single) <= 45 and {r["category"] for r in color} == {"object", "color"}
    for r in color:
        turns = _turns(r)
        if r["category"] == "color":
            assert list(turns) == [QUESTIONS["color"]] and "marker" in r
            assert turns[QUESTIONS["color"]] in synthetic.OBJECT_COLORS
        else:
            assert set(turns) == set(synthetic.OBJECT_QUESTIONS.values())
    train = _records(tmp_path, "train")
    assert 5 <= sum(r["category"] == "object" for r in train) <= 25
    assert all(len(_turns(r)) == 7 for r in train if r["category"] == "all")
    with pytest.raises(ValueError, match="train_objects is a fraction"):
        write_dataset(tmp_path / "bad", train=2, val=2, test=2, train_objects=20)


def _cell_colours(pixels):
    """[H, W, 3] image -> the object colour name seen in each column's cell (None: none
    visible): the commonest achromatic pixel that is not background, as markers tint what
    they cover."""
    names = {v: k for k, v in synthetic.OBJECT_COLORS.items()}
    grey = _object_pixels(pixels)
    out = []
    rows = slice(synthetic.CELL, 2 * synthetic.CELL)  # the middle row
    for k in range(synthetic.NUM_OBJECTS):
        cols = slice(k * synthetic.CELL, (k + 1) * synthetic.CELL)
        values, counts = np.unique(pixels[rows, cols][grey[rows, cols]], axis=0, return_counts=True)
        out.append(names.get(tuple(values[counts.argmax()])) if len(values) else None)
    return out


def test_color_split_asks_count_and_training_markers_drawn_in_evaluation_style(tmp_path):
    """make.sh's data options (stop 18). `color_count` makes that share of the color split's
    scenes ask the count question (its answer the number of cells whose object has the marked
    one's colour); `constant_markers` draws that share of the training markers as the held-out
    splits do: alpha 128, so each pixel under the marker is the half-way blend of the marker's
    colour and the scene's; `task_aux=False` leaves the auxiliary questions out of train."""
    from vipllava_jax.processing.visual_prompts import COLORS

    write_dataset(tmp_path, train=80, val=2, test=2, color=80, color_count=0.5, constant_markers=0.5,
                  task_aux=False)
    for r in _records(tmp_path, "train"):  # task_aux=False: the five questions, no auxiliary one
        assert set(_turns(r)) == set(QUESTIONS.values())
    color = _records(tmp_path, "color")
    counted = [r for r in color if r["category"] == "count"]
    assert 20 <= len(counted) <= 60 and {r["category"] for r in color} == {"color", "count"}
    checked = 0
    for r in counted:
        (question, answer), = _turns(r).items()
        assert question == QUESTIONS["count"]
        pixels = np.asarray(PIL.Image.open(tmp_path / r["image"]).convert("RGB")).astype(int)
        cells = _cell_colours(pixels)
        if r["marker"] in ("mask", "point") or None in cells:  # the marked object tinted all over
            continue
        assert answer == synthetic.COUNT_WORDS[cells.count(cells[r["marked"]])], (r, cells)
        checked += 1
    assert checked >= 5
    bases = np.array([synthetic.BACKGROUND, *synthetic.OBJECT_COLORS.values()])  # under a marker
    for split in ("train", "color"):
        records = _records(tmp_path, split)
        styles = [r["marker_style"] for r in records]
        assert 0.25 <= styles.count("constant") / len(styles) <= 0.75 and set(styles) == {"constant", "random"}
        agree = 0
        for r in records:
            pixels = np.asarray(PIL.Image.open(tmp_path / r["image"]).convert("RGB")).astype(int)
            marked = pixels[(pixels.max(-1) - pixels.min(-1)) > 0]  # the scene is achromatic
            halves = np.round(np.array(COLORS[r["marker_color"]]) * 128 / 255 + bases * 127 / 255)
            half = np.abs(marked[:, None] - halves[None]).max(-1).min(-1) <= 1  # [pixels]
            agree += half.all() == (r["marker_style"] == "constant")
        assert agree >= 0.9 * len(records), (split, agree, len(records))
    assert {r["marker_style"] for r in _records(tmp_path, "test")} == {"constant"}


def _experiment_tool():
    from tools.tiny_vipllava import experiment

    return experiment


def test_recipe_experiment_trains_and_scores_marked_twins(capsys):
    """tools/tiny_vipllava/experiment.py (how recipe settings are compared) runs end to end:
    a few steps on in-memory marked scenes, scored per question type, marker and twin pair."""
    experiment = _experiment_tool()
    experiment.main(["--task", "marked", "--steps", "2", "--warmup-steps", "1", "--batch-size", "8",
                     "--test", "20", "--eval-every", "2"])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("step 2 loss ") and " pairs " in line, line
    for name in (*CATEGORIES, "rectangle", "scribble"):
        assert f" {name} " in line, line
    records = experiment.draw_records("marked", "test", 10, 0, list(CATEGORIES))
    assert len(records) == 10 and all(a[2] == b[2] for a, b in zip(records[0::2], records[1::2]))


def test_recipe_experiment_shape_probe_reads_the_objects_cells():
    """experiment.py's `shape_probe` (the tower diagnosis) reads the shipped model's tokens of
    the objects' cells: unmarked shapes well above chance (1/3; measured 84% with 400 scenes)."""
    from vipllava_jax import VipLlavaForConditionalGeneration, VipLlavaProcessor
    from vipllava_jax.embedded import EMBEDDED_MODEL

    path = EMBEDDED_MODEL
    probes = _experiment_tool().shape_probe(VipLlavaForConditionalGeneration.from_pretrained(path),
                                            VipLlavaProcessor.from_pretrained(path), scenes=400)
    assert set(probes) == {"marked", "unmarked", "transfer"}
    assert probes["unmarked"] > 0.7 and all(1 / 3 < v <= 1 for v in probes.values()), probes


def test_recipe_experiment_mixes_markers_alone_and_objects_records(monkeypatch):
    """experiment.py's curriculum options: `marker_only` records show the marker and nothing
    else and ask the auxiliary questions (test: "where", every third record); `count_aux` asks
    how many objects have a named colour; `objects` puts the objects task's records into the
    marked task's training set; `object_where` asks the objects task where its object is."""
    experiment = _experiment_tool()
    aux = set(synthetic.AUX_QUESTIONS.values())
    for image, turns, _, _ in experiment.draw_records("objects", "train", 6, 0, [], marker_only=1.0):
        assert {q for q, _ in turns} == aux
        pixels = np.asarray(image)
        grey = np.all(pixels == pixels[..., :1], axis=-1)  # achromatic: background or object
        assert np.all(pixels[grey] == synthetic.BACKGROUND)  # no object, only the marker
    test = experiment.draw_records("objects", "test", 6, 0, [], marker_only=0.5)
    assert [r[2] for r in test].count("where") == 2
    assert all(turns[0][1] in synthetic.POSITIONS for _, turns, cat, _ in test if cat == "where")
    counts = {"white": "two", "black": "one", "gray": "zero"}  # in the scene drawn below
    fixed = Scene(tuple(SceneObject("square", c, (16 * i + 2, 18, 16 * i + 12, 28))
                        for i, c in enumerate(("white", "black", "white"))))
    with monkeypatch.context() as m:
        m.setattr(synthetic, "random_scene", lambda rng: fixed)
        counted = experiment.draw_records("marked", "train", 9, 0, list(CATEGORIES), count_aux=True)
    for _, turns, _, _ in counted:
        asked = [(q, a) for q, a in turns if q.startswith("How many objects have the color ")]
        assert len(turns) == 8 and len(asked) == 1
        colour = asked[0][0].removeprefix("How many objects have the color ").removesuffix("?")
        assert asked[0][1] == counts[colour]
    mixed = experiment.draw_records("marked", "train", 6, 0, list(CATEGORIES), objects=1.0)
    assert all({q for q, _ in turns} == set(synthetic.OBJECT_QUESTIONS.values()) for _, turns, _, _ in mixed)
    seen = 0
    for image, turns, _, _ in experiment.draw_records("objects", "train", 8, 0, [], object_where=True):
        column = synthetic.POSITIONS.index(dict(turns)[synthetic.OBJECT_WHERE])
        pixels = np.asarray(image)
        xs = np.nonzero(_object_pixels(pixels))[1]  # its visible pixels
        assert len(turns) == 3 and np.all(xs // synthetic.CELL == column)
        seen += xs.size > 0
    assert seen >= 4  # (a filled mask may hide all of it)


MAKE_SH = Path(__file__).parents[2] / "tools" / "tiny_vipllava" / "make.sh"
MARKER = ".tiny_vipllava_make"  # make.sh's mark on the work folders it made


def _make_sh(work, stub_bin=None):
    """Runs make.sh on `work`; with `stub_bin` first on PATH (a `python` that fails at once)."""
    env = dict(os.environ)
    if stub_bin is not None:
        env["PATH"] = f"{stub_bin}{os.pathsep}{env['PATH']}"
    return subprocess.run(["bash", str(MAKE_SH), str(work)], capture_output=True, text=True, env=env,
                          timeout=60)


def _tree(folder):
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in folder.rglob("*")}


def test_make_sh_refuses_a_foreign_folder_and_deletes_nothing(tmp_path):
    """make.sh deletes its earlier outputs (data/, train/, model/, ...) in its work folder, so a
    non-empty folder it did not make (here shaped like a checkout) is refused untouched."""
    foreign = tmp_path / "checkout"
    for name in ("train/__init__.py", "data/records.jsonl", "model/config.json", "README.md"):
        (foreign / name).parent.mkdir(parents=True, exist_ok=True)
        (foreign / name).write_text(name)
    before = _tree(foreign)
    result = _make_sh(foreign)
    assert result.returncode == 2, result
    assert result.stdout == "" and len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith("make.sh: refusing ") and MARKER in result.stderr
    assert _tree(foreign) == before


def test_make_sh_makes_its_folder_and_reruns_there(tmp_path):
    """A new folder gets make.sh's marker, and a second run in it passes the check (and clears
    its earlier outputs). `python` is a stub that fails, so the recipe itself never runs."""
    stub_bin = tmp_path / "bin"
    stub_bin.mkdir()
    (stub_bin / "python").write_text(f'#!/bin/sh\necho "$@" >> "{tmp_path}/python_calls"\nexit 3\n')
    (stub_bin / "python").chmod(0o755)
    work = tmp_path / "work" / "tiny"
    first = _make_sh(work, stub_bin)
    assert first.returncode == 3 and (work / MARKER).is_file(), first
    (work / "data").mkdir()
    (work / "data" / "old.jsonl").write_text("an earlier run's data")
    second = _make_sh(work, stub_bin)
    assert second.returncode == 3, second
    assert not (work / "data").exists() and (work / MARKER).is_file()
    calls = (tmp_path / "python_calls").read_text().splitlines()
    assert len(calls) == 2 and all(c.startswith("-m tools.synthetic --out data ") for c in calls)
