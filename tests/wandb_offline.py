"""Read an offline W&B run back (wandb has no public offline reader): history, config, summary.

The ``.wandb`` file is a 7-byte ':W&B' header followed by a LevelDB-style log of 32 KiB
blocks; each record has a 7-byte header (crc32, length, type: full / first / middle / last)
and the payload of full or reassembled records is a protobuf ``Record``.

When is the file complete? Not when ``run.finish()`` returns. wandb-core (the service process)
buffers the log in memory and writes it out when the run's stream closes; ``finish()`` waits for
the exit record to be handled, then only *sends* the "finish" message that closes the stream, and
returns without waiting for it. ``wandb.teardown()`` does wait: it sends "teardown" on the same
connection, which the service handles after the "finish" messages (one connection's requests are
handled in order, and handling "finish" returns once the stream's writer has closed the file), and
it then joins the service process. So:

* a run made in this process: ``finished_run_file(folder)`` calls ``wandb.teardown()`` first;
* a run made in a child process that started its own service: the child's exit is the event
  (its atexit hook runs the same teardown), so read after ``subprocess.run`` returns;
* either way ``read_run`` insists on the run's exit record, which wandb writes last, so a file
  read too early fails loudly instead of quietly giving fewer rows.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

from google.protobuf import json_format
from wandb.proto import wandb_internal_pb2

BLOCK = 32 * 1024
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _payloads(data: bytes):
    assert data[:4] == b":W&B", "not a .wandb file"
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < HEADER:  # block trailer padding
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if kind == 0 and length == 0:
            pos += BLOCK - pos % BLOCK if pos % BLOCK else 0
            continue
        if pos + HEADER + length > len(data):  # cut off mid-record: the caller sees no exit record
            return
        chunk = data[pos + HEADER: pos + HEADER + length]
        pos += HEADER + length
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            yield pending + chunk
            pending = b""


def finished_run_file(folder: str | Path) -> Path:
    """The one offline run file under ``folder`` (the ``dir`` given to wandb.init), once W&B has
    finished writing it.

    ``wandb.teardown()`` returns only after this process's W&B service has closed every run
    file and exited (see the module's docstring); it does nothing when this process never
    started W&B (a run logged by a child process is finished once the child has exited).
    The next ``wandb.init`` starts a fresh service.
    """
    import wandb

    wandb.teardown()
    files = sorted(Path(folder).glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1, f"expected one offline W&B run under {folder}, found {files}"
    return files[0]


def read_run(path: str | Path) -> dict:
    """{'history': [ {key: value} per step ], 'config': {...}, 'summary': {...}, 'run': {'group', 'job_type'},
    'metrics': [ each define_metric as a dict ],
    'artifacts': [ {'name', 'type', 'digest', 'aliases', 'files', 'staged'} ]} of one finished offline run.

    Fails if the file has no exit record yet (the W&B service is still writing it): get the path
    from ``finished_run_file``.
    """
    history, config, summary, run, metrics, artifacts = [], {}, {}, {}, [], []
    exited = False
    for payload in _payloads(Path(path).read_bytes()):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                            for item in record.history.item})
        elif kind in ("config", "run"):
            if kind == "run":
                run = {"group": record.run.run_group, "job_type": record.run.job_type}
            updates = record.config.update if kind == "config" else record.run.config.update
            for item in updates:
                config[item.key] = json.loads(item.value_json)
        elif kind == "summary":
            for item in record.summary.update:
                summary[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
        elif kind == "metric":
            metrics.append(json_format.MessageToDict(record.metric, preserving_proto_field_name=True))
        elif kind == "artifact":
            artifacts.append({"name": record.artifact.name, "type": record.artifact.type,
                              "digest": record.artifact.digest, "aliases": sorted(record.artifact.aliases),
                              "files": sorted(entry.path for entry in record.artifact.manifest.contents),
                              # where an offline run keeps each file until `wandb sync` uploads it
                              "staged": {entry.path: entry.local_path for entry in record.artifact.manifest.contents}})
        elif kind == "exit":
            exited = True
    assert exited, (f"{path} has no exit record: W&B has not finished writing it "
                    "(read it via finished_run_file, or after the process that logged it has exited)")
    return {"history": history, "config": config, "summary": summary, "run": run, "metrics": metrics,
            "artifacts": artifacts}
