"""The edit record: one schema with a version, written by the app and read back by resume and the report."""
import json

from cpds_exp.records import SCHEMA_VERSION, EditRecord, load_record


def test_a_record_reads_back_as_written(tmp_path):
    record = EditRecord(image="cat0", source_prompt="a cat", target_prompt="a dog", method="cpds", fingerprint="f",
                        status="done", clip=0.25, final={"cut/total": 1.5}, snapshots=["snapshots/iter_0050.png"])
    record.save(tmp_path)
    data = json.loads((tmp_path / "summary.json").read_text())
    assert data["schema_version"] == SCHEMA_VERSION and data["clip"] == 0.25
    assert load_record(tmp_path / "summary.json") == record


def test_records_that_do_not_fit_the_schema_are_not_loaded(tmp_path):
    base = dict(image="cat0", source_prompt="a cat", target_prompt="a dog", method="dds", fingerprint="f",
                status="done", schema_version=SCHEMA_VERSION)
    cases = {"older": {**base, "schema_version": None}, "pending": {**base, "status": "pending"},
             "no image": {k: v for k, v in base.items() if k != "image"}}
    for name, data in cases.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text(json.dumps(data))
    loaded = {name: load_record(tmp_path / name / "summary.json") for name in cases}
    assert loaded["older"] is None and loaded["pending"] is None and loaded["no image"] is None
    (tmp_path / "extra").mkdir()
    (tmp_path / "extra" / "summary.json").write_text(json.dumps({**base, "from_a_newer_tool": 1}))
    assert load_record(tmp_path / "extra" / "summary.json").method == "dds"  # unknown keys are ignored
