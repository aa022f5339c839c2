"""The report's figures: what each one shows (axes, titles, captions, bands, lines), read back from
the matplotlib objects, and the PNG/PDF files they are saved as."""
import io
import re

import matplotlib
import numpy as np
import pytest
from matplotlib.text import Text
from PIL import Image

from cpds_exp.errors import CpdsError
from cpds_exp.evaluation.figures import (FULL_WIDTH, MAX_IMAGES, MIN_FONT_PT, STYLE, build_figures, comparison_grid,
                                         lr_ablation, palette, selector_accuracy, tradeoff, write_figures)
from cpds_exp.evaluation.frame import ci95, records_frame, rounds_frame
from cpds_exp.evaluation.report import scan_records
from cpds_exp.records import EditRecord

COMMON = dict(status="done", metrics_protocol="corrected", source_prompt="a photo of a cat",
              target_prompt="a photo of a dog", task="cat2dog")


def sweep(root, edits):
    """A fake sweep: a folder per edit with its summary.json and small source and result images."""
    for i, edit in enumerate(edits):
        folder = root / f"job{i}"
        folder.mkdir(parents=True)
        EditRecord(**{**COMMON, "method": "cpds", "fingerprint": f"f{i}", **edit}).save(folder)
        Image.new("RGB", (32, 32), (200, 100, 0)).save(folder / "source.png")
        Image.new("RGB", (32, 32), (0, (37 * i) % 256, 120)).save(folder / "result.png")
    records = scan_records(root)[0]
    return records_frame(records), rounds_frame(records)


def texts(figure):
    """Every visible, non-empty text of a figure."""
    return [t.get_text() for t in figure.findobj(Text) if t.get_visible() and t.get_text()]


def small_texts(figure):
    return [(t.get_text(), t.get_fontsize()) for t in figure.findobj(Text)
            if t.get_visible() and t.get_text() and t.get_fontsize() < MIN_FONT_PT]


def fits(figure):
    """Whether the rendered figure has a blank border: nothing drawn (text, legend, image) is cut."""
    buffer = io.BytesIO()
    with matplotlib.rc_context(STYLE):
        figure.savefig(buffer, format="png", dpi=100)
    pixels = np.asarray(Image.open(buffer).convert("L"))
    return all((edge == 255).all() for edge in (pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]))


def methods_sweep(tmp_path, images=("cat0", "cat1")):
    edits = [dict(image=image, method=method, clip=0.2 + 0.01 * i, lpips=0.1 + 0.01 * j)
             for i, image in enumerate(images) for j, method in enumerate(("cpds", "dds", "cds"))]
    edits.append(dict(image=images[0], method="pds", status="diverged", diverged_at=37))
    return sweep(tmp_path, edits)


def test_grid_has_a_tile_per_image_and_value_titled_with_task_prompts_and_display_names(tmp_path):
    frame, _ = methods_sweep(tmp_path)
    figure = comparison_grid(frame, "method", "cat → dog")
    assert len(figure.axes) == 2 * (4 + 1)  # images × (DDS, CDS, PDS, CPDS + source)
    assert figure.get_suptitle() == "cat → dog: 'a photo of a cat' → 'a photo of a dog'"
    assert [axis.get_title() for axis in figure.axes[:5]] == ["Source", "DDS", "CDS", "PDS", "CPDS"]
    assert [axis.get_ylabel() for axis in figure.axes[::5]] == ["cat0", "cat1"]
    # row cat1, column CDS: clip 0.21, lpips 0.12 (j = 2), to 4 decimals
    assert figure.axes[5 + 2].get_xlabel() == "CLIP 0.2100\nLPIPS 0.1200"
    assert figure.axes[5 + 2].get_images()
    diverged = figure.axes[3]  # cat0, PDS
    assert not diverged.get_images() and [t.get_text() for t in diverged.texts] == ["diverged\nat iteration 37"]
    assert [t.get_text() for t in figure.axes[5 + 3].texts] == ["not run"]  # cat1 has no PDS edit
    assert figure.get_figwidth() == FULL_WIDTH and small_texts(figure) == []


def test_grid_is_capped_and_puts_prompts_per_row_when_they_differ(tmp_path):
    edits = [dict(image=f"img{i}", method=m, source_prompt=f"a cat {i}", target_prompt=f"a dog {i}", task=None,
                  clip=0.3, lpips=0.2) for i in range(MAX_IMAGES + 1) for m in ("dds", "cpds")]
    frame, _ = sweep(tmp_path, edits)
    assert len(comparison_grid(frame, "method").axes) == MAX_IMAGES * 3
    figure = comparison_grid(frame, "method", max_images=2)
    assert len(figure.axes) == 2 * 3
    assert figure.get_suptitle() == "All edits"
    labels = [" ".join(axis.get_ylabel().split()) for axis in figure.axes[::3]]
    assert labels == ["img0: 'a cat 0' → 'a dog 0'", "img1: 'a cat 1' → 'a dog 1'"]


def test_missing_or_damaged_files_are_grey_tiles_saying_so(tmp_path):
    frame, _ = sweep(tmp_path, [dict(image="a", method=m, clip=0.3, lpips=0.2) for m in ("dds", "cds")])
    (tmp_path / "job0" / "result.png").write_bytes(b"not a png")  # DDS's
    for folder in ("job0", "job1"):
        (tmp_path / folder / "source.png").unlink()
    figure = comparison_grid(frame, "method")
    assert [[t.get_text() for t in axis.texts] for axis in figure.axes] == [["source missing"], ["result missing"], []]
    assert not figure.axes[1].get_images() and figure.axes[2].get_images()


def test_a_sweep_without_tasks_gets_one_grid_named_all_and_no_none(tmp_path):
    frame, rounds = sweep(tmp_path, [dict(image="a", method=m, task=None, clip=0.3, lpips=0.2) for m in ("dds", "cds")])
    figures = dict(build_figures(frame, rounds, "method"))
    assert list(figures) == ["grid/all", "tradeoff/all"]
    assert figures["grid/all"].get_suptitle() == "'a photo of a cat' → 'a photo of a dog'"
    assert not any("None" in text for figure in figures.values() for text in texts(figure))


def test_other_varying_fields_get_rows_of_their_own(tmp_path):
    frame, _ = sweep(tmp_path, [dict(image="a", method=m, seed=s, clip=0.3, lpips=0.2)
                                for m in ("dds", "cpds") for s in (0, 1)])
    figure = comparison_grid(frame, "method")
    assert [axis.get_ylabel() for axis in figure.axes[::3]] == ["a, seed 0", "a, seed 1"]


def test_a_field_that_follows_the_columns_gets_no_rows(tmp_path):
    """Each method at its own default lr (DDS 0.1, CPDS 0.8): one row per image, no 'not run' tiles."""
    frame, _ = sweep(tmp_path, [dict(image=i, method=m, lr=lr, clip=0.3, lpips=0.2)
                                for i in ("a", "b") for m, lr in (("dds", 0.1), ("cpds", 0.8))])
    figure = comparison_grid(frame, "method")
    assert [axis.get_ylabel() for axis in figure.axes[::3]] == ["a", "b"]
    assert not any("not run" in text for text in texts(figure))
    assert lr_ablation(frame, "method", palette(frame, "method")) is None  # no method ran at two lrs


def test_lr_ablation_band_is_the_95_ci_over_edits(tmp_path):
    values = {0.1: [0.20, 0.22, 0.27], 0.8: [0.30, 0.31, 0.35]}
    frame, _ = sweep(tmp_path, [dict(image=f"c{i}", lr=lr, clip=v, lpips=v / 2)
                                for lr, vs in values.items() for i, v in enumerate(vs)]
                     + [dict(image="c9", lr=0.8, status="diverged")])
    figures = dict(build_figures(frame, rounds_frame([]), "lr"))
    assert list(figures) == ["grid/cat2dog", "lr_ablation/cat2dog", "tradeoff/cat2dog"]
    figure = figures["lr_ablation/cat2dog"]
    assert len(figure.axes) == 2
    assert [a.get_ylabel() for a in figure.axes] == ["CLIP ↑", "LPIPS ↓"]
    [band] = figure.axes[0].collections
    vertices = band.get_paths()[0].vertices
    for lr, vs in values.items():
        at = vertices[np.isclose(vertices[:, 0], lr), 1]
        assert at.min() == pytest.approx(np.mean(vs) - ci95(vs)) and at.max() == pytest.approx(np.mean(vs) + ci95(vs))
    [line] = figure.axes[0].get_lines()
    assert list(line.get_ydata()) == pytest.approx([np.mean(values[0.1]), np.mean(values[0.8])])
    assert [t.get_text() for t in figure.legends[0].get_texts()] == ["mean (n = 3, 1 diverged excluded)"]
    assert [t.get_text() for t in figure.axes[0].get_xticklabels()] == ["0.1", "0.8"]


def test_no_lr_ablation_when_lr_is_fixed_or_nothing_was_measured(tmp_path):
    frame, _ = sweep(tmp_path, [dict(image="a", lr=lr, method=m) for lr in (0.1, 0.8) for m in ("dds", "cds")])
    colours = palette(frame, "method")
    assert lr_ablation(frame, "method", colours) is None  # metrics=none
    assert tradeoff(frame, "method", colours) is None
    assert lr_ablation(frame[frame["lr"] == 0.1], "method", colours) is None
    figure = comparison_grid(frame, "method")
    assert {a.get_xlabel() for a in figure.axes[1::3]} == {"CLIP –\nLPIPS –"}


def rounds_sweep(tmp_path):
    """Two selectors over three rounds (round 1 not measured yet), known accuracies, positive rate 0.8."""
    accuracy = {"knn": [[0.6, 0.7], [0.8, 0.9]], "meta": [[0.5, 0.55], [0.65, 0.7], [0.75, 0.8]]}
    edits = []
    for selector, per_edit in accuracy.items():
        for i, values in enumerate(per_edit):
            rounds = [{"round": 1, "accuracy": None, "balanced_accuracy": None, "positive_rate": 0.8}]
            rounds += [{"round": r + 2, "accuracy": v, "balanced_accuracy": v - 0.1, "positive_rate": 0.8}
                       for r, v in enumerate(values)]
            edits.append(dict(image=f"c{i}", method="cds", selector=selector, clip=0.2, lpips=0.1,
                              selector_rounds=rounds))
    return accuracy, *sweep(tmp_path, edits)


def test_selector_accuracy_ticks_band_n_and_majority_line(tmp_path):
    accuracy, _, rounds = rounds_sweep(tmp_path)
    figure = selector_accuracy(rounds)
    assert len(figure.axes) == 2
    for axis in figure.axes:
        assert axis.get_ylim() == (0, 1)
        ticks = [t for t in axis.get_xticks() if axis.get_xlim()[0] <= t <= axis.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks)
    majority = [line for line in figure.axes[0].get_lines() if line.get_label().startswith("majority class")]
    assert len(majority) == 1 and list(majority[0].get_ydata()) == [0.8, 0.8]
    assert majority[0].get_zorder() > max(line.get_zorder() for line in figure.axes[0].get_lines()[:-1])
    balanced_majority = figure.axes[1].get_lines()[-1]
    assert list(balanced_majority.get_ydata()) == [0.5, 0.5]
    legend = [t.get_text() for t in figure.legends[0].get_texts()]
    assert legend == ["Meta-learner (n = 3 edits)", "KNN (n = 2 edits)", "majority class: accuracy 0.80",
                      "majority class: balanced accuracy 0.50"]
    knn = next(line for line in figure.axes[0].get_lines() if line.get_label().startswith("KNN"))
    assert list(knn.get_xdata()) == [2, 3] and list(knn.get_ydata()) == pytest.approx([0.7, 0.8])
    band = figure.axes[0].collections[1].get_paths()[0].vertices  # KNN's, drawn second
    at_round_2 = band[np.isclose(band[:, 0], 2), 1]
    assert at_round_2.max() == pytest.approx(0.7 + ci95([0.6, 0.8]))


def test_no_rounds_no_accuracy_figure(tmp_path):
    frame, rounds = sweep(tmp_path, [dict(image="a", method="cds", clip=0.2, lpips=0.1)])
    assert rounds.empty and selector_accuracy(rounds) is None
    assert "selector_accuracy" not in dict(build_figures(frame, rounds, "method"))


def test_tradeoff_has_every_edit_and_means_with_ci_in_both_directions(tmp_path):
    clip = {"dds": [0.20, 0.24, 0.25], "cpds": [0.22, 0.23]}
    lpips = {"dds": [0.30, 0.20, 0.40], "cpds": [0.10, 0.12]}
    edits = [dict(image=f"c{i}", method=m, clip=c, lpips=lp) for m in clip for i, (c, lp) in
             enumerate(zip(clip[m], lpips[m]))]
    diverged = [dict(image="c9", method=m, status="diverged") for m in ("cpds", "pds")]
    frame, _ = sweep(tmp_path, edits + diverged)
    figure = tradeoff(frame, "method", palette(frame, "method"), "cat → dog")
    [axis] = figure.axes
    assert (axis.get_xlabel(), axis.get_ylabel()) == ("CLIP ↑", "LPIPS ↓")
    assert [len(c.get_offsets()) for c in axis.collections if c.get_offsets().shape[0] > 0
            and type(c).__name__ == "PathCollection"] == [3, 2]
    legend = [t.get_text() for t in figure.legends[0].get_texts()]
    assert legend == ["DDS (n = 3)", "PDS: 1 diverged, none finished", "CPDS (n = 2, 1 diverged excluded)"]
    dds = axis.containers[0]
    (x_bars, y_bars) = dds.lines[2]
    [[(x0, y0), (x1, _)]] = x_bars.get_segments()
    assert (x0 + x1) / 2 == pytest.approx(np.mean(clip["dds"])) and y0 == pytest.approx(np.mean(lpips["dds"]))
    assert (x1 - x0) / 2 == pytest.approx(ci95(clip["dds"]))
    [[(_, y0), (_, y1)]] = y_bars.get_segments()
    assert (y1 - y0) / 2 == pytest.approx(ci95(lpips["dds"]))


def test_a_single_edit_has_a_mean_and_no_bars(tmp_path):
    frame, _ = sweep(tmp_path, [dict(image="a", method="cpds", clip=0.2, lpips=0.1)])
    figure = tradeoff(frame, "method", palette(frame, "method"))
    [axis] = figure.axes
    [mean] = axis.containers
    assert mean.has_xerr is False and mean.has_yerr is False
    assert [t.get_text() for t in figure.legends[0].get_texts()] == ["CPDS (n = 1)"]


def png_width(path):
    with Image.open(path) as image:
        return image.width


def pdf_pages(path):
    return len(re.findall(rb"/Type\s*/Page\b", path.read_bytes()))


def test_write_figures_saves_png_at_column_width_and_one_page_vector_pdfs(tmp_path):
    _, frame, rounds = rounds_sweep(tmp_path / "sweep")
    paths = write_figures(frame, rounds, tmp_path / "report", "selector", dpi=100)
    assert list(paths) == ["grid/cat2dog", "tradeoff/cat2dog", "selector_accuracy"]
    for key, (png, pdf) in paths.items():
        stem = tmp_path / "report" / "figures" / key
        assert (png, pdf) == (stem.with_name(f"{stem.name}.png"), stem.with_name(f"{stem.name}.pdf"))
        assert png_width(png) <= FULL_WIDTH * 100
        assert pdf.read_bytes().startswith(b"%PDF") and pdf_pages(pdf) == 1
        assert b"/Font" in pdf.read_bytes()  # text stays text (vector), not pixels
    assert png_width(paths["grid/cat2dog"][0]) == FULL_WIDTH * 100
    assert not list((tmp_path / "report").rglob("*.tmp"))
    again = write_figures(frame, rounds, tmp_path / "again", "selector", dpi=100)
    for key in paths:  # same inputs, same bytes
        assert [p.read_bytes() for p in again[key]] == [p.read_bytes() for p in paths[key]]


def test_no_text_under_7_pt_or_cut_off_and_global_style_untouched(tmp_path):
    before = dict(matplotlib.rcParams)
    _, frame, rounds = rounds_sweep(tmp_path / "selectors")
    figures = dict(build_figures(frame, rounds, "selector"))
    lr_frame, _ = sweep(tmp_path / "methods", [dict(image=f"c{i}", method=m, lr=lr, clip=0.2 + i / 100, lpips=0.1, task="cat2pig",
                                                    status="diverged" if i == 3 else "done")
                                               for m in ("dds", "cds", "pds", "cpds", "cds_matched")
                                               for lr in (0.1, 0.8) for i in range(4)])
    figures.update(build_figures(lr_frame, rounds_frame([]), "method"))
    assert len(figures) == 3 + 3
    for key, figure in figures.items():
        assert small_texts(figure) == [] and fits(figure), key
    assert dict(matplotlib.rcParams) == before


def test_bad_options_name_the_fix(tmp_path):
    frame, rounds = sweep(tmp_path, [dict(image="a", method="cds")])
    with pytest.raises(CpdsError, match="no field 'colour'.*method, selector or lr"):
        list(build_figures(frame, rounds, "colour"))
    with pytest.raises(CpdsError, match="max_images=0"):
        list(build_figures(frame, rounds, "method", max_images=0))
