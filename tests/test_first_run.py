"""The first ten minutes on a fresh clone, through the real CLI: offline in seconds with one line naming
every way forward, quiet output, --help, one-line config errors, no empty run folders, and config.yaml
agreeing with summary.json on the task. The network is never touched: HF_HUB_OFFLINE, or a hub
endpoint on a closed local port (refused at once)."""
import io
import json
import logging
import socket
import subprocess
import sys
import warnings

import pytest
import yaml
from tqdm import tqdm

from conftest import REPO
from test_cli import child_env
from test_datasets import make_photos

from cpds_exp.app import run
from cpds_exp.console import ProgressBarSafeHandler
from cpds_exp.errors import CpdsError
from cpds_exp.evaluation.metrics import Lpips
from cpds_exp.models import build_tiny

TINY = ("model=tiny", "metrics=random", "logger=none", "progress=false")
README = str(REPO / "README.md")


def run_cli(*args, cwd, env=None):
    """`python run.py ...` from ``cwd`` as a user runs it, with ``env`` changes (None removes a variable)."""
    environment = child_env()
    for key, value in (env or {}).items():
        environment.pop(key, None) if value is None else environment.__setitem__(key, value)
    return subprocess.run([sys.executable, str(REPO / "run.py"), *args], cwd=cwd, env=environment,
                          capture_output=True, text=True, timeout=600)


def closed_port() -> int:
    """A local port nothing listens on: a connection to it is refused at once."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def unreachable_hub(tmp_path) -> dict:
    """The environment of a machine whose hub does not answer (HF_HUB_OFFLINE unset), with an empty cache."""
    return {"HF_HUB_OFFLINE": None, "TRANSFORMERS_OFFLINE": None, "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}", "HF_HOME": str(tmp_path / "hf")}


def only_line(proc) -> str:
    """stderr, which must be exactly one line."""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


# --- 1. offline: at once, one line, every way forward ------------------------------------------

def test_the_default_run_offline_is_one_line_naming_every_way_forward(tmp_path):
    proc = run_cli("method=cpds", "selector=meta", "lr=0.8", cwd=tmp_path)  # HF_HUB_OFFLINE=1 (conftest)
    line = only_line(proc)
    assert proc.returncode == 2
    assert line.startswith("error: cannot load CLIP ViT-B-16-quickgelu with 'openai' weights (about 600 MB)")
    for way in ("model=tiny metrics=random", "debug=fast", "metrics=none", "connect once", "HF_HUB_OFFLINE is set"):
        assert way in line
    assert "Retry" not in proc.stdout + proc.stderr
    assert not (tmp_path / "outputs").exists()  # nothing of the run was written: no folder is left


def test_an_unreachable_hub_is_known_from_its_first_refused_request(tmp_path):
    proc = run_cli("logger=none", cwd=tmp_path, env=unreachable_hub(tmp_path))  # open_clip: no retries either
    line = only_line(proc)
    assert line.startswith("error: cannot load CLIP ViT-B-16-quickgelu with 'openai' weights (about 600 MB)")
    assert "did not answer" in line and "Retry" not in proc.stdout + proc.stderr
    proc = run_cli("metrics=none", "logger=none", cwd=tmp_path, env=unreachable_hub(tmp_path))
    line = only_line(proc)
    assert proc.returncode == 2
    assert line.startswith("error: cannot load model 'CompVis/stable-diffusion-v1-4' "
                           "(SD v1.x in float32: about 4.3 GB)")
    assert "did not answer" in line and "model=tiny metrics=random" in line and "model.pretrained=" in line
    assert "Retry" not in proc.stdout + proc.stderr  # one request, no retries


def test_cached_weights_load_without_the_hub_and_without_notices(tmp_path):
    """A hub id in huggingface_hub's cache (the tiny stack saved as a hub snapshot) loads offline."""
    repo = tmp_path / "hf" / "hub" / "models--someone--tiny-sd"
    commit = "0123456789abcdef0123456789abcdef01234567"
    build_tiny(0).save_pretrained(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    out = tmp_path / "run"
    proc = run_cli(*TINY, "model.pretrained=someone/tiny-sd", "iterations=2", f"hydra.run.dir={out}",
                   cwd=tmp_path, env=unreachable_hub(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "summary.json").read_text())["status"] == "done"
    for notice in ("Retry", "accelerate", "local_dir_use_symlinks", "Loading weights", "Warning"):
        assert notice not in proc.stdout + proc.stderr, notice


def test_a_missing_lpips_backbone_offline_is_one_line_with_its_size():
    with pytest.raises(CpdsError) as info:  # TORCH_HOME is an empty folder (conftest)
        Lpips("alex", pretrained=True)
    message = str(info.value)
    assert message.startswith("cannot load the LPIPS alex backbone (233 MB): it is not in the cache")
    assert "\n" not in message and "metrics=none" in message and "model=tiny metrics=random" in message


# --- 2. quiet by default -------------------------------------------------------------------------

def test_a_tiny_run_prints_no_warnings_and_only_its_own_log_lines(tmp_path):
    proc = run_cli(*TINY, "iterations=2", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.strip() == ""  # no deprecation warnings, no library notices
    lines = proc.stdout.strip().splitlines()
    assert lines and all("][cpds_exp." in line for line in lines), proc.stdout  # no library INFO lines
    assert any("dahlia: 'a photo of an orange dahlia' -> 'a photo of a blue dahlia'" in line for line in lines)


def test_lpips_builds_without_torchvision_deprecation_warnings():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Lpips("squeeze", pretrained=False)
    assert [str(w.message) for w in caught if "deprecated" in str(w.message)] == []


def test_a_log_line_is_printed_above_a_progress_bar_not_inside_it():
    stream = io.StringIO()
    logger = logging.getLogger("cpds_exp.test_first_run")
    handler = ProgressBarSafeHandler(stream)
    logger.addHandler(handler)
    try:
        with tqdm(total=10, desc="images", file=stream, ascii=True, mininterval=0) as bar:
            bar.update(3)
            logger.warning("an edit is done")
            bar.update(1)
    finally:
        logger.removeHandler(handler)
    [line] = [line for line in stream.getvalue().split("\n") if "an edit is done" in line]
    assert line.split("\r")[-1] == "an edit is done"  # the bar was cleared first: the line stands alone
    after = stream.getvalue().split("an edit is done\n", 1)[1]
    assert "images:" in after and "3/10" in after  # and drawn again below it


# --- 3. help, config errors, folders, task -------------------------------------------------------

def test_help_says_what_this_is_where_the_readme_is_and_lists_groups_and_experiments(tmp_path):
    proc = run_cli("--help", cwd=tmp_path)
    assert proc.returncode == 0 and proc.stderr.strip() == ""
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("cpds-exp: text-guided image editing by score distillation on Stable Diffusion")
    assert any(line.endswith(README) for line in lines[:4])
    assert "+experiment=NAME" in proc.stdout
    experiments = sorted(path.stem for path in (REPO / "conf" / "experiment").glob("*.yaml"))
    assert lines[lines.index(next(l for l in lines if "+experiment=NAME" in l)) + 1] == ", ".join(experiments)
    assert "model:     sd14*, sd15, sd21, sd21base, sdxl, tiny, tiny_sdxl, tiny_v" in lines and "task:      cat2cow, cat2dog*, cat2pig" in lines
    assert "_schema" not in proc.stdout.split("== Config (")[0]  # the typed schemas are not options to pick


def test_a_value_of_the_wrong_type_names_the_key_and_its_type_in_one_line(tmp_path):
    proc = run_cli(*TINY, "iterations=abc", cwd=tmp_path)
    assert proc.returncode == 2
    assert only_line(proc) == ("error: invalid config: iterations=abc: Value 'abc' of type 'str' could not be "
                               "converted to Integer; iterations takes an integer, default 200")
    proc = run_cli(*TINY, "lr=fast", cwd=tmp_path)
    assert only_line(proc).endswith("; lr takes a number or null, default null")


def test_a_run_refused_on_bad_input_leaves_no_folder(tmp_path):
    proc = run_cli(*TINY, "lr=-1", cwd=tmp_path)  # the default folder: outputs/runs/<date>/<time>_cpds
    assert proc.returncode == 2 and only_line(proc).startswith("error: lr=-1.0 must be positive")
    assert not (tmp_path / "outputs").exists()
    proc = run_cli(*TINY, "lr=-1", f"hydra.run.dir={tmp_path / 'runs' / 'one'}", cwd=tmp_path)
    assert proc.returncode == 2 and not (tmp_path / "runs").exists()


def test_a_folder_that_existed_or_holds_a_record_is_kept(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    proc = run_cli(*TINY, "lr=-1", f"hydra.run.dir={mine}", cwd=tmp_path)
    assert proc.returncode == 2 and mine.is_dir()  # not created by the run: never removed
    diverged = tmp_path / "diverged"
    proc = run_cli(*TINY, "method=dds", "lr=3e38", f"hydra.run.dir={diverged}", cwd=tmp_path)
    assert proc.returncode == 2 and "NaN/Inf" in only_line(proc)
    assert json.loads((diverged / "summary.json").read_text())["status"] == "diverged"


@pytest.mark.parametrize("dataset, task", [
    ("sample", None),                                    # the dahlia: no task, whatever the task group says
    ("cats", "cat2pig"),                                 # a folder read with the task's prompts
    ("single", "cat2pig"),                               # one image given the task (table2_published)
    ("single", None),                                    # one image with prompts of its own
])
def test_config_yaml_and_the_records_agree_on_the_task(compose_config, tmp_path, dataset, task):
    photos = make_photos(tmp_path / "photos", count=2)
    options = {"sample": (), "cats": (f"dataset.path={photos}",),
               "single": (f"dataset.image={photos / 'cat0.png'}", "dataset.source_prompt=a cat",
                          "dataset.target_prompt=a pig") + (("dataset.task=${task.name}",) if task else ())}
    records = run(compose_config(*TINY, "iterations=1", "task=cat2pig", f"dataset={dataset}", *options[dataset]),
                  tmp_path / "out")
    written = yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())
    assert [record["task"] for record in records] == [task] * len(records) and records
    assert written["task"] == (None if task is None else {"name": "cat2pig", "source_prompt": "a cat",
                                                          "target_prompt": "a pig"})
