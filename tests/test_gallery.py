"""The static gallery (report/index.html): parsed back, every link resolves, a row per image and a
cell per setting, the scores shown, text escaped."""
import shutil
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import pytest

from cpds_exp.errors import CpdsError
from cpds_exp.evaluation.frame import records_frame
from cpds_exp.evaluation.gallery import page_name, result_keys, write_gallery
from cpds_exp.evaluation.report import scan_records
from test_report import write_records

HOSTILE = "a <script>alert('x')</script> & \"dog\""


class Page(HTMLParser):
    """What a test needs from a page: links, table rows of cells (tag, attributes, text), buttons, scripts."""

    def __init__(self, path: Path):
        super().__init__()
        self.links, self.buttons, self.scripts, self.sections = [], [], 0, {}
        self.section, self.cell = None, None
        self.feed(path.read_text())

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag in ("thead", "tbody", "tfoot"):
            self.section = self.sections.setdefault(tag, [])
        elif tag == "tr" and self.section is not None:
            self.section.append([])
        elif tag in ("td", "th") and self.section is not None:
            self.cell = {"tag": tag, "attrs": attrs, "text": "", "images": 0}
            self.section[-1].append(self.cell)
        elif tag == "img":
            self.links.append(attrs["src"])
            if self.cell is not None:
                self.cell["images"] += 1
        elif tag == "a":
            self.links.append(attrs["href"])
        elif tag == "button":
            self.buttons.append(attrs)
        elif tag == "script":
            self.scripts += 1

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.cell = None
        elif tag in ("thead", "tbody", "tfoot"):
            self.section = None

    def handle_data(self, data):
        if self.cell is not None:
            self.cell["text"] += data


def resolved(page: Path, link: str) -> Path:
    return (page.parent / unquote(link)).resolve()


def sweep(tmp_path, rows):
    """A fake sweep of ``rows`` and its gallery page, parsed."""
    write_records(tmp_path, rows)
    records, _ = scan_records(tmp_path)
    index = write_gallery(records_frame(records), tmp_path / "report")
    return index, Page(index)


METHODS = ("cpds", "dds", "cds")  # written out of the paper's order
ROWS = [dict(image=image, method=method, task="cat2dog", clip=0.25 + 0.125 * i, lpips=0.5 - 0.125 * i,
             target_prompt=HOSTILE if image == "b" else "a dog")
        for image in ("b", "a") for i, method in enumerate(METHODS)]
ROWS += [dict(image="c", method="dds", task="cat2dog", status="diverged", diverged_at=7),
         dict(image="c", method="cds", task="cat2dog", status="skipped", reason="cannot read c.png")]


def test_gallery_has_a_row_per_image_and_a_cell_per_method(tmp_path):
    index, page = sweep(tmp_path, ROWS)
    assert index == tmp_path / "report" / "index.html"
    [header] = page.sections["thead"]
    assert [cell["text"].split("CLIP")[0] for cell in header] == ["sourceimage", "DDS", "CDS", "CPDS"]
    body = page.sections["tbody"]
    assert [row[0]["attrs"]["data-image"] for row in body] == ["a", "b", "c"]
    assert all([cell["tag"] for cell in row] == ["th", "td", "td", "td"] for row in body)
    assert [[cell["images"] for cell in row] for row in body] == [[1, 1, 1, 1], [1, 1, 1, 1], [1, 0, 0, 0]]
    a, b, c = body
    assert [cell["text"] for cell in a[1:]] == ["CLIP 0.3750 · LPIPS 0.3750", "CLIP 0.5000 · LPIPS 0.2500",
                                               "CLIP 0.2500 · LPIPS 0.5000"]  # DDS, CDS, CPDS
    assert [cell["attrs"].get("data-clip") for cell in a[1:]] == ["0.375", "0.5", "0.25"]
    assert [cell["text"] for cell in c[1:]] == ["diverged at iteration 7", "skipped: cannot read c.png", "–"]
    assert not any("data-clip" in cell["attrs"] for cell in c[1:])  # nothing to sort by: last
    assert "cat → dog" in a[0]["text"] and "“a cat” → “a dog”" in a[0]["text"]
    [footer] = page.sections["tfoot"]
    assert footer[1]["text"] == "n = 2 · CLIP 0.3750 ± 0.0000 · LPIPS 0.3750 ± 0.0000 · 1 diverged"
    assert footer[3]["text"].startswith("n = 2 · CLIP 0.2500 ± 0.0000")


def test_every_link_resolves_to_the_edits_own_images(tmp_path):
    index, page = sweep(tmp_path, ROWS)
    targets = {resolved(index, link) for link in page.links}
    assert all(path.is_file() for path in targets)
    results = {p.resolve() for p in tmp_path.glob("job*/edits/*/result.png") if not p.parent.name.startswith("c-")}
    sources = {p.resolve() for p in tmp_path.glob("job*/edits/*/source.png")}
    assert results <= targets <= results | sources and len(targets & sources) == 3  # one source per image
    moved = shutil.move(str(tmp_path), str(tmp_path.parent / "moved"))  # relative links move with the sweep
    assert all(not link.startswith("/") and resolved(Path(moved) / "report/index.html", link).is_file()
               for link in page.links)


def test_sort_buttons_name_columns_holding_their_score(tmp_path):
    index, page = sweep(tmp_path, ROWS)
    body = page.sections["tbody"]
    assert len(page.buttons) == 1 + 2 * 3 and page.scripts == 1
    for button in page.buttons:
        key, column = button["data-key"], int(button["data-col"])
        values = [row[column]["attrs"].get(f"data-{key}") for row in body]
        assert sum(v is not None for v in values) == (3 if key == "image" else 2)
        assert button["data-descending"] == ("true" if key == "clip" else "false")  # best first


def test_prompts_are_shown_escaped(tmp_path):
    index, page = sweep(tmp_path, ROWS)
    raw = index.read_text()
    assert "<script>alert" not in raw and raw.count("<script>") == 1
    b = page.sections["tbody"][1]
    assert HOSTILE in b[0]["text"]  # the reader sees the prompt as written


def test_swept_values_make_the_columns(tmp_path):
    rows = [dict(image=image, method="cpds", lr=lr, w_cut=3.0, clip=0.25, lpips=0.25)
            for image in ("a", "b") for lr in (0.8, 0.1, 0.4)]
    _, page = sweep(tmp_path, rows)
    [header] = page.sections["thead"]
    assert [cell["text"].split("CLIP")[0] for cell in header[1:]] == ["lr 0.1", "lr 0.4", "lr 0.8"]
    assert len(page.sections["tbody"]) == 2


def test_result_keys_keep_only_settings_that_split_the_results(tmp_path):
    rows = [dict(image="a", method=m, lr=lr, selector=s, clip=0.25, lpips=0.25)
            for m, lr in (("dds", 0.1), ("cpds", 0.8)) for s in ("random", "knn")]
    write_records(tmp_path, rows)
    frame = records_frame(scan_records(tmp_path)[0])
    assert result_keys(frame) == ["method", "selector"]  # lr follows the method: no column of its own
    assert result_keys(frame[frame["method"] == "dds"]) == ["selector"]
    assert result_keys(frame[(frame["method"] == "dds") & (frame["selector"] == "knn")]) == ["method"]


def test_several_sweeps_get_a_page_each_and_an_index(tmp_path):
    rows = [dict(image="a", method="cds", sweep_name=name, clip=0.25, lpips=0.25) for name in ("table1", "index")]
    index, page = sweep(tmp_path, rows)
    assert [Path(unquote(link)).name for link in page.links] == [page_name("index"), "table1.html"]
    assert page_name("index") != "index.html"
    for link in page.links:
        sweep_page = Page(resolved(index, link))
        assert len(sweep_page.sections["tbody"]) == 1
        assert all(resolved(index, target).is_file() for target in sweep_page.links)  # images and the way back
    assert write_gallery(records_frame(scan_records(tmp_path)[0]), tmp_path / "again").read_bytes() == \
        index.read_bytes()  # the same records, the same page


def test_an_empty_sweep_is_refused(tmp_path):
    with pytest.raises(CpdsError, match="no edits to show in the gallery"):
        write_gallery(records_frame([]), tmp_path)


def test_the_report_writes_the_gallery(tmp_path):
    from cpds_exp.evaluation.report import build_report

    write_records(tmp_path, ROWS)
    build_report(tmp_path)
    page = Page(tmp_path / "report" / "index.html")
    assert len(page.sections["tbody"]) == 3 and all(resolved(tmp_path / "report/index.html", link).is_file()
                                                    for link in page.links)
