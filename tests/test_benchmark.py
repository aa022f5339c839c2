"""The LAION-style benchmark builder: filters, ranking, de-duplication, inputs and outputs."""
from __future__ import annotations

import csv
import io
import json
import math
import runpy
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO
from cpds_exp.tools.laion_benchmark import ClipEmbedder, Rules, build_benchmark, dedup, load_candidates, select
from cpds_exp.data import folder, manifest
from cpds_exp.errors import CpdsError

QUERY = "a photo of a cat"
CAPTION = "a cat on a sofa"


class FakeEmbedder:
    """Image i is a solid PNG whose red value is 10·i; its embedding is (query cos, caption cos, rest).

    The rest goes to a dimension of its own, so two different images are never duplicates."""

    def __init__(self, sims: dict[int, tuple[float, float]]):
        self.vectors = {}
        for i, (query, caption) in sims.items():
            vector = torch.zeros(2 + len(sims) + 1)
            vector[0], vector[1], vector[2 + i] = query, caption, math.sqrt(1 - query ** 2 - caption ** 2)
            self.vectors[i] = vector

    def images(self, images):
        return torch.stack([self.vectors[img.getpixel((0, 0))[0] // 10] for img in images])

    def texts(self, texts):
        basis = {QUERY: 0, CAPTION: 1}
        return torch.stack([torch.eye(len(self.vectors[0]))[basis[t]] for t in texts])


#: key, image index (None: no file), query and caption cosines, width, height, punsafe, pwatermark
ROWS = [
    ("good_best", 0, 0.9, 0.3, 512, 512, "UNLIKELY", 0.1),
    ("dup_of_best", 0, 0.9, 0.3, 512, 512, 0.0, 0.1),  # the identical image
    ("good_second", 1, 0.7, 0.3, 300, 256, 0.5, 0.8),  # every rule at its boundary
    ("good_third", 2, 0.5, 0.4, 512, 512, 0.0, 0.0),
    ("nsfw", 3, 0.95, 0.3, 512, 512, 0.9, 0.1),
    ("watermark", 4, 0.95, 0.3, 512, 512, 0.0, 0.95),
    ("narrow", 5, 0.95, 0.3, 100, 512, 0.0, 0.1),
    ("short", 6, 0.95, 0.3, 512, 255, 0.0, 0.1),
    ("off_caption", 7, 0.95, 0.27, 512, 512, 0.0, 0.1),
    ("missing", None, 0.95, 0.3, 512, 512, 0.0, 0.1),
]
EXPECTED = {
    "dup_of_best": "duplicate of good_best", "good_third": "below the top 2", "nsfw": "nsfw 0.9 > 0.5",
    "watermark": "watermark 0.95 > 0.8", "narrow": "size 100x512 < 256x256", "short": "size 512x255 < 256x256",
    "off_caption": "clip similarity 0.270 < 0.28", "missing": "no image on disk",
}


def _png(index: int, size: int = 16) -> Image.Image:
    return Image.new("RGB", (size, size), (10 * index, 0, 0))


def _laion(tmp_path: Path) -> tuple[Path, Path, FakeEmbedder]:
    """A CSV of ROWS and a folder of their images named by key."""
    images = tmp_path / "images"
    images.mkdir()
    for key, index, *_ in ROWS:
        if index is not None:
            _png(index).save(images / f"{key}.png")
    metadata = tmp_path / "meta.csv"
    with metadata.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["key", "url", "caption", "width", "height", "similarity", "punsafe", "pwatermark"])
        for key, _index, _q, caption_sim, width, height, nsfw, watermark in ROWS:
            writer.writerow([key, f"https://x.org/{key}.jpg", CAPTION, width, height, 0.3, nsfw, watermark])
    sims = {index: (q, c) for _key, index, q, c, *_ in ROWS if index is not None}
    return metadata, images, FakeEmbedder(sims)


def test_each_rule_drops_exactly_its_rows_and_the_rest_are_ranked(tmp_path):
    metadata, images, embedder = _laion(tmp_path)
    candidates = load_candidates(images, metadata)
    chosen = select(candidates, QUERY, top=2, embedder=embedder)

    assert [c.key for c in chosen] == ["good_best", "good_second"]
    assert [c.rank for c in chosen] == [1, 2]
    assert chosen[0].query_similarity == pytest.approx(0.9) and chosen[0].clip_similarity == pytest.approx(0.3)
    reasons = {c.key: "; ".join(c.reasons) for c in candidates if c.reasons}
    assert reasons == EXPECTED


def test_dedup_keeps_the_higher_ranked_of_near_identical_embeddings():
    embeddings = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1], [0.6, 0.8]]), dim=-1)
    assert dedup([0, 1, 2, 3], embeddings, threshold=0.99) == {2: 0}
    assert dedup([2, 0, 1, 3], embeddings, threshold=0.99) == {0: 2}
    assert dedup([0, 1, 2, 3], embeddings, threshold=0.79) == {2: 0, 3: 1}


def test_outputs_are_written_and_the_manifest_dataset_reads_them(tmp_path):
    metadata, images, embedder = _laion(tmp_path)
    out = tmp_path / "cats"
    build_benchmark(images, QUERY, 2, out, metadata, embedder, target_prompt="a photo of a dog")

    items = manifest(str(out / "manifest.csv"))
    assert [item.name for item in items] == ["0001_good_best", "0002_good_second"]
    assert items[0].source_prompt == QUERY and items[0].target_prompt == "a photo of a dog"
    assert items[1].load().getpixel((0, 0)) == (10, 0, 0)
    selection = {row["key"]: row for row in csv.DictReader((out / "selection.csv").open())}
    assert len(selection) == len(ROWS)
    assert selection["good_best"]["status"] == "kept" and selection["good_best"]["rank"] == "1"
    assert selection["narrow"]["status"] == "dropped" and selection["narrow"]["reason"] == EXPECTED["narrow"]
    assert Image.open(out / "preview" / "contact_sheet.png").size[0] > 0
    as_folder = folder(str(out), QUERY, "a photo of a dog")  # dataset=cats reads the same images
    assert [item.name for item in as_folder] == [item.name for item in items]


def test_laion_spellings_in_parquet_and_url_named_files(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    images = tmp_path / "images"
    (images / "00000").mkdir(parents=True)
    _png(0).save(images / "00000" / "cat1.png")
    _png(1).save(images / "00000" / "cat2.png")
    table = pa.Table.from_pylist([
        {"URL": "https://x.org/a/cat1.jpg?size=2", "TEXT": CAPTION, "WIDTH": 512, "HEIGHT": 512, "SIMILARITY": 0.3,
         "NSFW": "UNLIKELY", "pwatermark": 0.1},
        {"URL": "https://x.org/b/cat2.jpg", "TEXT": CAPTION, "WIDTH": 512, "HEIGHT": 512, "SIMILARITY": 0.3,
         "NSFW": "NSFW", "pwatermark": 0.1},
    ])
    pq.write_table(table, tmp_path / "meta.parquet")
    candidates = load_candidates(images, tmp_path / "meta.parquet")
    assert [(c.key, c.nsfw) for c in candidates] == [("cat1", 0.0), ("cat2", 1.0)]
    chosen = select(candidates, QUERY, 5, FakeEmbedder({0: (0.9, 0.3), 1: (0.8, 0.3)}))
    assert [c.key for c in chosen] == ["cat1"]


def _shards(folder: Path, count: int = 4) -> None:
    """An img2dataset-style webdataset shard; the last sample's caption is only in its .txt."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    with tarfile.open(folder / "00000.tar", "w") as tar:
        for i in range(count):
            key = f"{i:09d}"
            meta = {"key": key, "url": f"https://x.org/{i}.jpg", "width": 512, "height": 512, "similarity": 0.3,
                    "punsafe": 0.01, "pwatermark": 0.02}
            if i < count - 1:
                meta["caption"] = f"a cat number {i}"
            buffer = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buffer, format="JPEG")
            files = {f"{key}.jpg": buffer.getvalue(), f"{key}.json": json.dumps(meta).encode()}
            if i == count - 1:
                files[f"{key}.txt"] = b"a cat from the txt\n"
            for name, data in files.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_webdataset_shards_through_the_cli_with_a_tiny_clip(tmp_path, monkeypatch, capsys):
    _shards(tmp_path / "shards")
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["build_benchmark.py", "--images", str(tmp_path / "shards"), "--query", QUERY,
                                      "--top", "3", "--out", str(out), "--clip", "tiny", "--min-similarity", "-1",
                                      "--dedup", "1.01", "--target-prompt", "a photo of a dog"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(REPO / "scripts" / "build_benchmark.py"), run_name="__main__")
    assert exit_.value.code == 0, capsys.readouterr().err
    assert "kept 3 of 4 rows" in capsys.readouterr().out
    items = manifest(str(out / "manifest.csv"))
    assert len(items) == 3 and all(item.load().size == (32, 32) for item in items)
    selection = list(csv.DictReader((out / "selection.csv").open()))
    assert "a cat from the txt" in {row["caption"] for row in selection}
    assert [row["reason"] for row in selection if row["status"] == "dropped"] == ["below the top 3"]
    ranked = sorted((row for row in selection if row["status"] == "kept"), key=lambda row: int(row["rank"]))
    assert [float(r["query_similarity"]) for r in ranked] == sorted((float(r["query_similarity"]) for r in ranked),
                                                                    reverse=True)
    assert (out / "preview" / "contact_sheet.png").is_file()


def test_bad_input_is_a_one_line_error(tmp_path):
    metadata, images, embedder = _laion(tmp_path)
    bad = tmp_path / "bad.csv"
    bad.write_text("key,caption,punsafe\na,a cat,0.1\n")
    with pytest.raises(CpdsError, match="lacks column.*watermark"):
        load_candidates(images, bad)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CpdsError, match="no images"):
        load_candidates(tmp_path / "empty", metadata)
    with pytest.raises(CpdsError, match="needs --metadata"):
        load_candidates(images)
    with pytest.raises(CpdsError, match="no row of 10 passed"):
        build_benchmark(images, QUERY, 2, tmp_path / "none", metadata, embedder, Rules(max_nsfw=-1))
    with pytest.raises(CpdsError, match="cannot load CLIP"):
        ClipEmbedder("no-such-model", None)


def test_the_laion_dataset_option_edits_a_built_benchmark(tmp_path, compose_config):
    from cpds_exp.app import run

    metadata, images, embedder = _laion(tmp_path)
    out = tmp_path / "laion_cats"
    build_benchmark(images, QUERY, 2, out, metadata, embedder, target_prompt="a photo of a dog")
    records = run(compose_config("dataset=laion", f"dataset.path={out / 'manifest.csv'}", "model=tiny",
                                 "metrics=random", "logger=none", "iterations=1", "progress=false"), tmp_path / "run")
    assert [(r["image"], r["status"], r["target_prompt"]) for r in records] == [
        ("0001_good_best", "done", "a photo of a dog"), ("0002_good_second", "done", "a photo of a dog")]
