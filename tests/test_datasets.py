"""Datasets (folder, manifest), bad input among good, and resume without repeating an edit."""
import json
import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from cpds_exp.app import run
from cpds_exp.data import EditItem, folder, load_image, manifest, single, unique_names
from cpds_exp.naming import safe_name
from cpds_exp.errors import CpdsError

FAST = ("model=tiny", "metrics=random", "logger=none", "iterations=2", "progress=false", "n_patches=8")


def make_photos(root, count=3, size=(40, 56)):
    root.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        array = (np.random.RandomState(i).rand(*size, 3) * 255).astype("uint8")
        Image.fromarray(array).save(root / f"cat{i}.png")
    return root


def test_folder_lists_images_sorted_with_the_prompt_pair(tmp_path):
    make_photos(tmp_path)
    (tmp_path / "notes.txt").write_text("not an image")
    items = folder(str(tmp_path), "a cat", "a dog", task="cat2dog")
    assert [i.name for i in items] == ["cat0", "cat1", "cat2"]
    assert {(i.source_prompt, i.target_prompt, i.task) for i in items} == {("a cat", "a dog", "cat2dog")}
    assert items[0].load().size == (56, 40)
    assert len(folder(str(tmp_path), "a cat", "a dog", limit=2)) == 2


def test_empty_or_missing_folder_is_one_line(tmp_path):
    with pytest.raises(CpdsError, match="has no images"):
        folder(str(tmp_path), "a cat", "a dog")
    with pytest.raises(CpdsError, match="does not exist"):
        folder(str(tmp_path / "nope"), "a cat", "a dog")


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig"])  # utf-8-sig: Excel's "CSV UTF-8" starts with a BOM
@pytest.mark.parametrize("kind", ["csv", "jsonl"])
def test_manifest_rows(tmp_path, kind, encoding):
    make_photos(tmp_path / "img", count=2)
    rows = [("img/cat0.png", "a cat", "a dog"), ("img/cat1.png", "a cat", "a fox")]
    if kind == "csv":
        text = "image,source_prompt,target_prompt\n" + "".join(f"{a},{b},{c}\n" for a, b, c in rows)
    else:
        text = "".join(json.dumps(dict(image=a, source_prompt=b, target_prompt=c)) + "\n" for a, b, c in rows)
    path = tmp_path / f"edits.{kind}"
    path.write_text(text, encoding=encoding)
    items = manifest(str(path))
    assert [(i.name, i.target_prompt) for i in items] == [("00000_cat0", "a dog"), ("00001_cat1", "a fox")]
    assert items[1].load().size == (56, 40)


def test_manifest_missing_column_and_empty_prompt(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("image,prompt\ncat.png,a cat\n")
    with pytest.raises(CpdsError, match="lacks column.*source_prompt, target_prompt"):
        manifest(str(bad))
    empty = tmp_path / "empty.csv"
    empty.write_text("image,source_prompt,target_prompt\ncat.png,a cat, \n")
    with pytest.raises(CpdsError, match="line 2 has no target_prompt"):
        manifest(str(empty))


def make_bomb(path):
    """A tiny PNG whose header claims 20000x10000 pixels: Pillow refuses it as a decompression bomb."""
    Image.new("RGB", (8, 8)).save(path)
    data = bytearray(path.read_bytes())
    data[16:24] = struct.pack(">II", 20000, 10000)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    return path


def one_line_error(call, *args) -> str:
    with pytest.raises(CpdsError) as err:
        call(*args)
    assert "\n" not in str(err.value)
    return str(err.value)


def test_unreadable_images_are_one_line_errors(tmp_path):
    photo = make_photos(tmp_path, count=1, size=(64, 64)) / "cat0.png"
    make_bomb(tmp_path / "bomb.png")
    assert "DecompressionBombError" in one_line_error(load_image, tmp_path / "bomb.png")
    Image.open(photo).save(tmp_path / "cat0.jpg", quality=95)
    for name in ("cat0.png", "cat0.jpg"):
        whole = (tmp_path / name).read_bytes()
        (tmp_path / f"cut-{name}").write_bytes(whole[: len(whole) // 2])
        assert "cannot be read as an image" in one_line_error(load_image, tmp_path / f"cut-{name}")


@pytest.mark.parametrize("dtype, top, suffix", [("uint16", 65535, "png"), ("int32", 65535, "tif"),
                                                ("float32", 1.0, "tif")])
def test_high_bit_depth_greyscale_is_scaled_not_clipped(tmp_path, dtype, top, suffix):
    ramp = np.linspace(0, top, 256).astype(dtype)[None].repeat(4, axis=0)
    Image.fromarray(ramp).save(tmp_path / f"ramp.{suffix}")
    loaded = np.asarray(load_image(tmp_path / f"ramp.{suffix}")).astype(int)
    assert (loaded == loaded[..., :1]).all()  # grey
    row = loaded[0, :, 0]
    assert row[0] == 0 and row[-1] == 255 and (np.diff(row) >= 0).all() and len(set(row)) > 200


def test_manifest_errors_name_the_file_line_and_problem(tmp_path):
    make_photos(tmp_path / "img", count=1)
    header, good = "image,source_prompt,target_prompt\n", "img/cat0.png,a cat,a dog\n"
    latin = tmp_path / "latin.csv"
    latin.write_bytes((header + good + "img/cat0.png,a cat,a dog in a café\n").encode("latin-1"))
    assert "latin.csv' line 3 is not UTF-8" in one_line_error(manifest, str(latin))
    short = tmp_path / "short.csv"
    short.write_text(header + good + "img/cat0.png,a cat\n")  # too few fields, on the third line
    assert "short.csv' line 3 has no target_prompt" in one_line_error(manifest, str(short))
    row = json.dumps(dict(image="img/cat0.png", source_prompt="a cat", target_prompt="a dog"))
    for line, problem in (("[1, 2]", "line 3 is not a JSON object"), ('"abc"', "line 3 is not a JSON object"),
                          (json.dumps(dict(image="img/cat0.png", target_prompt="a dog")), "line 3 has no source_prompt"),
                          (json.dumps(dict(image=None, source_prompt="a", target_prompt="b")), "line 3 has no image")):
        bad = tmp_path / "bad.jsonl"
        bad.write_text(f"{row}\n\n{line}\n")
        assert f"bad.jsonl' {problem}" in one_line_error(manifest, str(bad))


@pytest.mark.parametrize("text, expected", [("../../x", "x"), ("/abs/x", "abs_x"), ("cat0-a_dog", "cat0-a_dog"),
                                            ("a red fox!", "a_red_fox"), ("un café à Zürich 🐱", "un_cafe_a_Zurich")])
def test_safe_name_is_readable(text, expected):
    assert safe_name(text) == expected


@pytest.mark.parametrize("text", ["..", "", ".", "/", "猫", "a" * 1000, "a photo of " * 100])
def test_safe_name_is_always_a_usable_folder(tmp_path, text):
    name = safe_name(text)
    assert name and len(name) <= 80 and not name.startswith(".") and name == safe_name(name)
    (tmp_path / name).mkdir()
    assert (tmp_path / name).parent == tmp_path
    assert safe_name(text + "b") != name  # distinct texts stay distinct, however long


def test_manifest_names_stay_inside_the_run_folder(tmp_path):
    make_photos(tmp_path / "img", count=1)
    path = tmp_path / "edits.jsonl"
    path.write_text("".join(json.dumps(dict(image="img/cat0.png", source_prompt="a cat", target_prompt="a dog",
                                            name=name)) + "\n" for name in ("../../x", "/abs/y", "..")))
    names = [item.name for item in manifest(str(path))]
    assert names[:2] == ["x", "abs_y"] and not names[2].startswith(".")


def test_colliding_names_get_stable_suffixes(tmp_path):
    photo = make_photos(tmp_path / "img", count=2)
    rows = [("img/cat0.png", "a dog", "same"), ("img/cat1.png", "a fox", "same"), ("img/cat1.png", "a fox", "own"),
            ("img/cat0.png", "a dog", "twice"), ("img/cat0.png", "a dog", "twice"), ("img/cat0.png", "a pig", "Own")]
    for order in (rows, rows[::-1]):
        (tmp_path / "m.csv").write_text("image,source_prompt,target_prompt,name\n" +
                                        "".join(f"{a},a cat,{b},{c}\n" for a, b, c in order))
        items = manifest(str(tmp_path / "m.csv"))
        names = {(i.path.name, i.target_prompt, i.name) for i in items}
        assert len({i.name.lower() for i in items}) == len(items)  # distinct even on a case-insensitive disk
        assert unique_names(items) == items  # idempotent
        if order is rows:
            first = names
            assert [i.name for i in items][:2] != ["same", "same"] and items[0].name.startswith("same-")
        else:
            assert names == first  # a row's folder does not depend on the order of the rows
    unique = [EditItem("cat0", "a cat", "a dog"), EditItem("cat1", "a cat", "a dog")]
    assert unique_names(unique) == unique
    edits = single(str(photo / "cat0.png"), "a cat", ["a dog!", "a dog?", "a fox"])
    assert len({i.name for i in edits}) == 3 and edits[2].name == "cat0-a_fox"
    assert edits[0].name.startswith("cat0-a_dog-")


def test_dataset_run_skips_and_records_an_unreadable_image(compose_config, tmp_path):
    photos = make_photos(tmp_path / "cats", count=2)
    (photos / "broken.png").write_text("not a png")
    records = run(compose_config(*FAST, "method=dds", "dataset=cats", f"dataset.path={photos}"), tmp_path / "out")
    status = {r["image"]: r["status"] for r in records}
    assert status == {"broken": "skipped", "cat0": "done", "cat1": "done"}
    skipped = json.loads((tmp_path / "out/edits/broken/summary.json").read_text())
    assert "cannot be read as an image" in skipped["reason"]
    done = json.loads((tmp_path / "out/edits/cat0/summary.json").read_text())
    for key in ("image", "source_prompt", "target_prompt", "method", "selector", "lr", "seed", "clip", "lpips",
                "time_s", "selector_accuracy", "task"):
        assert key in done, key
    assert done["task"] == "cat2dog" and done["target_prompt"] == "a dog"


def test_rerun_resumes_and_force_recomputes(compose_config, tmp_path):
    photos = make_photos(tmp_path / "cats", count=2)
    overrides = (*FAST, "method=cds", "dataset=cats", f"dataset.path={photos}", "task=cat2pig")
    out = tmp_path / "out"
    first = run(compose_config(*overrides), out)
    results = [out / "edits" / name / "result.png" for name in ("cat0", "cat1")]
    stamps = [os.stat(p).st_mtime_ns for p in results]
    # an edit interrupted before its record was written is redone; the finished one is not
    (out / "edits/cat1/summary.json").unlink()
    second = run(compose_config(*overrides), out)
    assert os.stat(results[0]).st_mtime_ns == stamps[0]
    assert os.stat(results[1]).st_mtime_ns != stamps[1]
    assert [r["fingerprint"] for r in second] == [r["fingerprint"] for r in first]
    # a setting that changes the edit does not reuse it; force recomputes everything
    changed = run(compose_config(*overrides, "lr=0.05"), out)
    assert all(r["lr"] == 0.05 for r in changed)
    run(compose_config(*overrides, "lr=0.05", "force=true"), out)
    assert os.stat(results[0]).st_mtime_ns != stamps[0]


def test_batched_dataset_run_matches_one_by_one(compose_config, tmp_path):
    photos = make_photos(tmp_path / "cats", count=3)
    overrides = (*FAST, "method=cpds", "dataset=cats", f"dataset.path={photos}", "iterations=3")
    alone = run(compose_config(*overrides), tmp_path / "one")
    batched = run(compose_config(*overrides, "batch_size=2"), tmp_path / "two")
    assert [r["batch_size"] for r in batched] == [2, 2, 1]
    for a, b in zip(alone, batched):
        assert a["image"] == b["image"] and a["fingerprint"] == b["fingerprint"]
        assert b["final"]["t"] == a["final"]["t"]
        assert b["final"]["cut/total"] == pytest.approx(a["final"]["cut/total"], rel=1e-3)
        assert b["lpips"] == pytest.approx(a["lpips"], abs=1e-3)
    # the same edits are already done in the batched run's folder whatever the batch size
    again = run(compose_config(*overrides, "batch_size=3"), tmp_path / "two")
    assert all("batch_size" in r and r["batch_size"] != 3 for r in again)


def test_one_image_with_several_target_prompts(compose_config, tmp_path):
    photo = make_photos(tmp_path / "in", count=1) / "cat0.png"
    records = run(compose_config(*FAST, "method=cds", "dataset=single", f"dataset.image={photo}",
                                 "dataset.source_prompt=a cat", "dataset.target_prompt=[a dog,a red fox]",
                                 "batch_size=2"), tmp_path / "out")
    assert [(r["image"], r["target_prompt"], r["batch_size"]) for r in records] == [
        ("cat0-a_dog", "a dog", 2), ("cat0-a_red_fox", "a red fox", 2)]
    assert (tmp_path / "out/edits/cat0-a_red_fox/result.png").is_file()


def test_skipped_image_is_not_retried_until_its_file_changes(compose_config, tmp_path):
    photos = make_photos(tmp_path / "cats", count=1)
    broken = photos / "broken.png"
    broken.write_text("not a png")
    overrides = (*FAST, "method=dds", "dataset=cats", f"dataset.path={photos}")
    run(compose_config(*overrides), tmp_path / "out")
    again = run(compose_config(*overrides), tmp_path / "out")
    assert {r["image"]: r["status"] for r in again} == {"broken": "skipped", "cat0": "done"}
    Image.new("RGB", (40, 40), "red").save(broken, format="PNG")  # fixed: now it is edited
    fixed = run(compose_config(*overrides), tmp_path / "out")
    assert {r["image"]: r["status"] for r in fixed} == {"broken": "done", "cat0": "done"}
