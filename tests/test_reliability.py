"""Hostile but fair use: failed sweeps, names that would escape, damaged files, faults, Ctrl-C,
two sweeps on one folder, and a killed parallel sweep. Every wait here waits on an event."""
import json
import os
import select
import signal
import subprocess
import sys

import pytest
from PIL import Image

from conftest import REPO
from cpds_exp.app import run
from cpds_exp.claims import try_claim, wait_for_claim
from cpds_exp.errors import CpdsError
from cpds_exp.naming import job_folder
from cpds_exp.records import EditRecord
from cpds_exp.evaluation.report import build_report
from test_cli import child_env, read_until, run_py, start_run_py
from test_datasets import FAST, make_bomb, make_photos

TINY = ("model=tiny", "metrics=random", "logger=none", "iterations=1", "progress=false", "n_patches=8")


def last_line(proc) -> str:
    return proc.stderr.strip().splitlines()[-1]


def single_photo(path, overrides=()):
    return ("dataset=single", f"dataset.image={path}", "dataset.source_prompt=a cat", "dataset.target_prompt=a dog",
            *overrides)


# --- 1. failed sweeps ------------------------------------------------------------------------
def test_failed_jobs_count_at_any_depth_and_only_for_this_sweep(tmp_path):
    photo, sweep = tmp_path / "in" / "cat.png", tmp_path / "sweep"
    args = ("-m", *TINY, *single_photo(photo), f"hydra.sweep.dir={sweep}")
    missing = run_py(*args, "lr=-1,0.1", cwd=tmp_path)  # the image is missing: both jobs fail
    assert missing.returncode == 2 and "error: 2 job(s) of the sweep failed" in last_line(missing)
    photo.parent.mkdir()
    Image.new("RGB", (64, 64), (200, 120, 40)).save(photo)
    again = run_py(*args, "lr=-1,0.1", cwd=tmp_path)  # a path in an override: job folders hold it
    assert again.returncode == 2 and "error: 1 job(s) of the sweep failed" in last_line(again)
    assert "lr=-1" in last_line(again) and "Traceback" not in again.stderr
    [stale] = list(sweep.rglob("FAILED"))  # the job that now succeeded removed its marker
    assert "lr=-1" in stale.parent.name
    clean = run_py(*args, "lr=0.1,0.2", cwd=tmp_path)  # lr=-1's old marker is not this sweep's
    assert clean.returncode == 0, clean.stderr[-2000:]


# --- 2, 3, 4, 12. names that become paths --------------------------------------------------
def test_an_escaping_sweep_name_is_refused_before_anything_is_written(tmp_path):
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    proc = run_py("-m", *TINY, "lr=0.1,0.2", "sweep_name=../../../escaped", cwd=work)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert last_line(proc).startswith("error: sweep_name='../../../escaped' is not a plain folder name")
    assert not list(tmp_path.rglob("escaped*")) and not list(tmp_path.rglob("*.png"))


def test_job_folders_leave_out_what_does_not_change_results_and_confine_paths():
    base = ["method=cds", "lr=0.1"]
    assert job_folder(base) == "lr=0.1,method=cds"
    neutral = ["batch_size=4", "snapshot_every=0", "log_every=1", "progress=false", "num_shards=2", "shard=1",
               "logger.mode=offline", "+experiment=table1", "dataset.limit=3", "device=cuda:1"]
    assert job_folder(base + neutral) == job_folder(base)
    a, b = job_folder(base + ["dataset.path=/data/a/cats"]), job_folder(base + ["dataset.path=/data/b/cats"])
    assert a != b and "cats" in a and "/" not in a + b
    climbing = job_folder(["model.pretrained=../../../../m", "dataset.target_prompt=a dog"])
    assert "/" not in climbing and ".." not in climbing.split(",")
    assert len(job_folder([f"dataset.target_prompt={'a very long prompt ' * 40}", "lr=0.1"])) <= 200


def test_sweeping_dataset_paths_and_batch_sizes_shares_finished_edits(tmp_path):
    sets = [make_photos(tmp_path / name / "cats", count=2) for name in ("one", "two")]
    sweep = tmp_path / "sweep"
    args = ("-m", *TINY, "dataset=cats", f"dataset.path={sets[0]},{sets[1]}", f"hydra.sweep.dir={sweep}")
    first = run_py(*args, "batch_size=1", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    results = sorted(sweep.rglob("result.png"))
    assert len(results) == 4 and len({p.parent.parent.parent for p in results}) == 2  # one job folder per path
    stamps = {p: p.stat().st_mtime_ns for p in results}
    again = run_py(*args, "batch_size=2", "snapshot_every=0", "log_every=1", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert {p: p.stat().st_mtime_ns for p in sweep.rglob("result.png")} == stamps  # reused, not recomputed


def test_colliding_and_escaping_names_get_their_own_folders_inside_the_run(compose_config, tmp_path):
    photos = make_photos(tmp_path / "img", count=1)
    rows = [dict(image="img/cat0.png", source_prompt="a cat", target_prompt=t, name=n)
            for t, n in (("a dog", "../../x"), ("a fox", "/abs/x"), ("a pig", "same"), ("a cow", "same"))]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run" / "out"
    records = run(compose_config(*FAST, "dataset=manifest", f"dataset.path={tmp_path / 'm.jsonl'}"), out)
    assert len(records) == 4 and all(r["status"] == "done" for r in records)
    assert len(list(out.glob("edits/*/result.png"))) == 4
    assert {p.name for p in (tmp_path / "run").iterdir()} == {"out"} and not (tmp_path / "x").exists()
    assert photos.is_dir()
    prompts = compose_config(*FAST, *single_photo(photos / "cat0.png"), "dataset.target_prompt=['a dog!','a dog?']")
    assert len({r["image"] for r in run(prompts, tmp_path / "p")}) == 2
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "p").rglob("result.png")}
    assert len(stamps) == 2
    run(prompts, tmp_path / "p")  # a re-run recomputes neither
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "p").rglob("result.png")} == stamps


# --- 5, 6. damaged inputs and records -------------------------------------------------------
def test_a_bomb_is_skipped_and_a_folder_of_nothing_readable_is_one_line(compose_config, tmp_path):
    photos = make_photos(tmp_path / "cats", count=1)
    make_bomb(photos / "huge.png")
    records = run(compose_config(*FAST, "dataset=cats", f"dataset.path={photos}"), tmp_path / "out")
    status = {r["image"]: r["status"] for r in records}
    assert status == {"cat0": "done", "huge": "skipped"}
    assert "DecompressionBombError" in json.loads((tmp_path / "out/edits/huge/summary.json").read_text())["reason"]
    (photos / "cat0.png").write_bytes(b"not a png")
    with pytest.raises(CpdsError, match=r"none of the 2 images could be read .*check dataset.path"):
        run(compose_config(*FAST, "dataset=cats", f"dataset.path={photos}"), tmp_path / "again")


@pytest.mark.parametrize("damage", [b"null", b"[1, 2]", b"\xff\xfe\x00garbage", b'{"fingerprint": 3}', b""])
def test_damaged_records_are_recomputed_by_the_run_and_listed_by_the_report(compose_config, tmp_path, damage):
    cfg = compose_config(*FAST, "dataset=cats", f"dataset.path={make_photos(tmp_path / 'cats', count=2)}")
    run(cfg, tmp_path / "out")
    record = tmp_path / "out/edits/cat0/summary.json"
    record.write_bytes(damage)
    report = build_report(tmp_path / "out")
    assert report["unreadable"] == [record] and report["counts"] == {"done": 1}
    records = run(cfg, tmp_path / "out")
    assert sorted(r["status"] for r in records) == ["done", "done"]
    assert json.loads(record.read_text())["status"] == "done"


def test_diverged_edits_are_final_until_forced(compose_config, tmp_path):
    cfg = compose_config(*FAST, "method=dds", "lr=3e38", "dataset=cats", f"dataset.path={make_photos(tmp_path / 'c', 2)}")
    records = run(cfg, tmp_path / "out")
    assert [r["status"] for r in records] == ["diverged", "diverged"]
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("summary.json")}
    assert [r["status"] for r in run(cfg, tmp_path / "out")] == ["diverged", "diverged"]
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("summary.json")} == stamps  # not recomputed
    run(compose_config(*FAST, "method=dds", "lr=3e38", "dataset=cats", f"dataset.path={tmp_path / 'c'}", "force=true"),
        tmp_path / "out")
    assert all(p.stat().st_mtime_ns != stamp for p, stamp in stamps.items())


def test_the_fingerprint_holds_the_resolved_dtype(compose_config, tmp_path):
    photos = make_photos(tmp_path / "c", 1)
    [auto] = run(compose_config(*FAST, "dataset=single", f"dataset.image={photos / 'cat0.png'}",
                                "dataset.source_prompt=a cat", "dataset.target_prompt=a dog"), tmp_path / "a")
    [explicit] = run(compose_config(*FAST, "dataset=single", f"dataset.image={photos / 'cat0.png'}",
                                    "dataset.source_prompt=a cat", "dataset.target_prompt=a dog", "dtype=float32"),
                     tmp_path / "b")
    assert auto["fingerprint"] == explicit["fingerprint"]  # auto is float32 on the CPU: the same edit
    [half] = run(compose_config(*FAST, "dataset=single", f"dataset.image={photos / 'cat0.png'}",
                                "dataset.source_prompt=a cat", "dataset.target_prompt=a dog", "dtype=bfloat16"),
                 tmp_path / "c16")
    assert half["dtype"] == "bfloat16" and half["fingerprint"] != auto["fingerprint"]


def test_report_script_lists_unreadable_records(tmp_path):
    EditRecord(image="a", source_prompt="a cat", target_prompt="a dog", method="dds", fingerprint="f",
               status="done", task="cat2dog", clip=0.2, lpips=0.1).save(tmp_path / "job" / "edits" / "a")
    (tmp_path / "job" / "edits" / "b").mkdir()
    (tmp_path / "job" / "edits" / "b" / "summary.json").write_bytes(b"\xff")
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "report.py"), str(tmp_path)], capture_output=True,
                          text=True, env=child_env())
    assert proc.returncode == 0 and "Traceback" not in proc.stderr
    assert "1 unreadable record(s)" in proc.stderr and "edits/b/summary.json" in proc.stderr


# --- 9, 10. values and faults ---------------------------------------------------------------
@pytest.mark.parametrize("key", ["guidance_scale", "w_dds", "w_cut"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_weights_are_refused_before_any_model_loads(compose_config, tmp_path, key, value):
    # metrics=default would fail offline when loaded: the error must come first
    with pytest.raises(CpdsError, match=rf"^{key}=-?(nan|inf) must be a finite number"):
        run(compose_config("model=tiny", "logger=none", f"{key}={value}"), tmp_path)


@pytest.mark.parametrize("override, message", [
    ("lrr=3", "error: invalid config: Could not override 'lrr'; Key 'lrr' not in 'AppConfig'; To append to your "
              "config use +lrr=3"),
    ("method=foo", "error: invalid config: In 'config': Could not find 'method/foo'; available: cds, cds_matched, "
                   "cpds, dds, pds"),
    ("iterations=abc", "error: invalid config: iterations=abc: Value 'abc' of type 'str' could not be converted "
                       "to Integer; iterations takes an integer, default 200")])
def test_a_misspelt_key_or_option_is_one_line(tmp_path, override, message):
    proc = run_py(*TINY, override, cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip() == message


def test_an_unwritable_output_folder_is_one_line(tmp_path):
    (tmp_path / "a_file").write_text("")
    proc = run_py(*TINY, f"hydra.run.dir={tmp_path / 'a_file' / 'run'}", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert last_line(proc).startswith("error: file system error") and "a_file" in last_line(proc)


FULL_DISK = """
import errno, sys
import cpds_exp.results as results
atomic = results.write_atomically
def full(path, write):
    if str(path).endswith("summary.json"):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    return atomic(path, write)
results.write_atomically = full
from cpds_exp.cli import main
main()
"""


def test_a_full_disk_is_one_line_and_finished_records_stay_whole(tmp_path):
    photos = make_photos(tmp_path / "cats", count=2)
    args = (*TINY, "dataset=cats", f"dataset.path={photos}", f"hydra.run.dir={tmp_path / 'out'}")
    assert run_py(*args, cwd=tmp_path).returncode == 0
    before = {p: p.read_bytes() for p in (tmp_path / "out").rglob("summary.json")}
    (tmp_path / "full_disk.py").write_text(FULL_DISK)
    proc = subprocess.run([sys.executable, str(tmp_path / "full_disk.py"), *args, "force=true"], cwd=tmp_path,
                          capture_output=True, text=True, env=child_env(), timeout=600)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "No space left on device" in last_line(proc) and last_line(proc).startswith("error: file system error")
    assert {p: p.read_bytes() for p in (tmp_path / "out").rglob("summary.json")} == before
    assert not list((tmp_path / "out").rglob("*.tmp"))


def test_ctrl_c_is_one_line_and_exit_130(tmp_path):
    proc = start_run_py(*TINY, "iterations=100000", f"hydra.run.dir={tmp_path / 'out'}", cwd=tmp_path)
    read_until(proc, "editing 1 image(s)")
    proc.send_signal(signal.SIGINT)
    rest = proc.stdout.read()
    assert proc.wait(timeout=600) == 130
    assert rest.strip().splitlines()[-1].startswith("error: interrupted") and "Traceback" not in rest


# --- 11. two sweeps on one folder ---------------------------------------------------------------
def test_two_identical_sweeps_at_once_compute_each_edit_once(tmp_path):
    photos = make_photos(tmp_path / "cats", count=4)
    args = ("-m", *TINY, "iterations=2", "method=dds,cds", "dataset=cats", f"dataset.path={photos}",
            f"hydra.sweep.dir={tmp_path / 'sweep'}")
    procs = [start_run_py(*args, cwd=tmp_path) for _ in range(2)]
    logs = [proc.communicate(timeout=600)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], logs[0][-2000:] + logs[1][-2000:]
    records = sorted((tmp_path / "sweep").rglob("summary.json"))
    assert len(records) == 8 and all(json.loads(p.read_text())["status"] == "done" for p in records)
    computed = [line.rsplit("written to ", 1)[1].strip() for log in logs for line in log.splitlines()
                if "written to " in line]
    assert sorted(computed) == sorted(str(p.parent) for p in records)  # each edit exactly once, by one of them


def claim_in_child(folder, hold: bool):
    """A child process that tries to claim ``folder``; with ``hold``, it keeps the claim until killed."""
    code = (f"import sys; from pathlib import Path; from cpds_exp.claims import try_claim\n"
            f"claim = try_claim(Path({str(folder)!r}))\nprint(claim is not None, flush=True)\n"
            + ("sys.stdin.read()\n" if hold else ""))
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    return child, child.stdout.readline().strip() == "True"


def test_a_claim_is_exclusive_and_freed_when_its_process_dies(tmp_path):
    held = try_claim(tmp_path)
    assert held is not None and json.loads((tmp_path / ".claim").read_text())["pid"] == os.getpid()
    child, claimed = claim_in_child(tmp_path, hold=False)
    child.wait()
    assert not claimed  # another process cannot take it
    assert try_claim(tmp_path, timeout_h=-1.0) is not None  # a claim past the age limit is taken over
    held.release()
    child, claimed = claim_in_child(tmp_path, hold=True)
    assert claimed and try_claim(tmp_path) is None
    child.kill()  # kill -9: the kernel frees the claim
    child.wait()
    claim = wait_for_claim(tmp_path)
    assert claim.fd is not None
    claim.release()


# --- 13. a killed parallel sweep takes its workers with it ---------------------------------------
def test_workers_of_a_killed_parallel_sweep_end(tmp_path):
    proc = start_run_py("-m", "hydra/launcher=parallel", "hydra.launcher.n_jobs=2", *TINY, "iterations=100000",
                        "method=dds,cds", f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path)
    lines = read_until(proc, "editing 1 image(s)", count=2)
    workers = [int(line.rsplit("(pid ", 1)[1].split(")")[0]) for line in lines if "editing 1 image(s)" in line]
    assert len(set(workers)) == 2 and proc.pid not in workers
    handles = [os.pidfd_open(pid) for pid in workers]
    proc.kill()
    proc.wait()
    for handle in handles:  # readable when the worker has exited; the timeout only guards against a hang
        assert select.select([handle], [], [], 300)[0] == [handle], "a worker outlived its sweep"
        os.close(handle)
