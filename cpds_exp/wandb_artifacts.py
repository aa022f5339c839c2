"""A manifest dataset as a W&B artifact: logged once (the manifest and the images its rows name),
and named in a small file beside the manifest, so that every run editing that manifest names the
artifact in its config and, online, declares it as its input (W&B lineage).

W&B resolves artifacts only online: an offline run keeps the name in its config alone.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

from cpds_exp.data import manifest
from cpds_exp.errors import CpdsError
from cpds_exp.loggers import CODE_KEY, code_version, resolve_wandb_mode, wandb_settings, warn_once
from cpds_exp.naming import safe_name
from cpds_exp.results import write_json

#: the file beside a manifest that names its artifact
ARTIFACT_FILE = "wandb_artifact.json"
#: the run config's key for the dataset's artifact
DATASET_KEY = "dataset_artifact"
#: files logged with the manifest when they lie beside it (the benchmark builder's selection log)
COMPANIONS = ("selection.csv",)


def dataset_files(manifest_path: Path) -> dict[str, Path]:
    """The artifact's files by their name in it: the manifest, its companions and every image its
    rows name (once), relative to the manifest's folder."""
    folder = manifest_path.parent
    files = {manifest_path.name: manifest_path}
    files.update({name: folder / name for name in COMPANIONS if (folder / name).is_file()})
    for item in manifest(str(manifest_path)):
        name = Path(os.path.relpath(item.path, folder)).as_posix()
        if not item.path.is_file():
            raise CpdsError(f"manifest row {item.name!r} names {item.path}, which is not a file: fix the row "
                            "or the image")
        if name.startswith("../"):
            raise CpdsError(f"manifest row {item.name!r} names {item.path}, outside the manifest's folder: an "
                            "artifact holds one folder, so put the images under it")
        files[name] = item.path
    return files


def log_dataset(manifest_path: str | Path, project: str = "cpds-exp", entity: str | None = None,
                mode: str = "auto") -> dict[str, Any] | None:
    """Log a manifest and its images as a ``dataset`` artifact (a run of job type ``dataset`` in the
    manifest's folder) and write :data:`ARTIFACT_FILE` beside it; returns what that file says (None
    when W&B is disabled: nothing is logged, so nothing is named).

    The alias ``digest-<md5 of the contents>`` pins this very content: a run that edits the
    manifest uses it, not whatever ``latest`` is by then."""
    import wandb

    mode = resolve_wandb_mode(mode)
    if mode == "disabled":
        return None
    manifest_path = Path(manifest_path).expanduser().resolve()
    folder = manifest_path.parent
    files = dataset_files(manifest_path)
    artifact = wandb.Artifact(safe_name(f"dataset-{folder.name}"), type="dataset",
                              metadata={"manifest": manifest_path.name, "files": len(files)})
    for name, path in sorted(files.items()):
        artifact.add_file(str(path), name=name)
    digest = artifact.manifest.digest()
    alias = f"digest-{digest}"
    run = wandb.init(project=project, entity=entity, mode=mode, job_type="dataset",
                     name=artifact.name, dir=str(folder), settings=wandb_settings(),
                     config={"manifest": str(manifest_path), CODE_KEY: code_version()}, reinit="create_new")
    run.log_artifact(artifact, aliases=["latest", alias])
    run.finish()
    prefix = f"{entity}/{project}" if entity else project
    named = {"name": artifact.name, "type": "dataset", "manifest": manifest_path.name, "project": project,
             "entity": entity, "digest": digest, "alias": alias, "reference": f"{prefix}/{artifact.name}:{alias}"}
    write_json(folder / ARTIFACT_FILE, named)
    return named


def dataset_artifact(run_config: Mapping[str, Any]) -> dict[str, Any] | None:
    """The artifact named beside the run's manifest (``dataset.path``), None when it has none."""
    dataset = run_config.get("dataset") or {}
    path = dataset.get("path") if isinstance(dataset, Mapping) else None
    if not path or not Path(path).expanduser().is_file():
        return None
    manifest_path = Path(path).expanduser()
    named_by = manifest_path.parent / ARTIFACT_FILE
    if not named_by.is_file():
        return None
    try:
        named = json.loads(named_by.read_text())
        reference, manifest = named["reference"], named["manifest"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CpdsError(f"{named_by} does not name an artifact ({type(err).__name__}: {err}): log the dataset "
                        "again (scripts/build_benchmark.py --wandb) or delete the file") from err
    if not isinstance(reference, str) or manifest != manifest_path.name:
        return None  # it names another manifest of the same folder
    return named


def declare_dataset(run: Any, named: Mapping[str, Any]) -> None:
    """Declare the artifact as the run's input (``run.use_artifact``); offline W&B cannot, and the
    run's config names it instead. An artifact the server does not know yet (logged offline and
    not synced) is a warning, not a failed edit."""
    import wandb

    if run.offline:
        return
    try:
        run.use_artifact(named["reference"], type="dataset")
    except (wandb.errors.Error, ValueError) as err:
        warn_once(f"W&B: cannot use the dataset artifact {named['reference']} ({str(err).splitlines()[0]}): "
                  "`wandb sync` the run that logged it, or log it again with scripts/build_benchmark.py --wandb")
