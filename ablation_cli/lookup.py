"""Which experiment folder: its name from the experiment and the dataset, and finding one under an
output folder by experiment name or dataset (a name as experiment.json records it, or a path)."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from ablation_cli.durable import read_json_object
from ablation_cli.errors import ExperimentError, NoExperimentError
from ablation_cli.records import dataset_location, same_place

EXPERIMENT_FILE = "experiment.json"


def dataset_slug(name: str) -> str:
    """A folder-name-safe form of a dataset name or path (``results/<experiment>_<slug>``)."""
    base = Path(name).name if ("/" in name or name.startswith(".")) else name
    return re.sub(r"[^A-Za-z0-9_.-]", "_", base) or "dataset"


def path_slug(path: Path) -> str:
    """A path dataset's folder-name part: its basename and a digest of the resolved path, so that two
    datasets both called ``train`` or ``hf_dataset`` never share an experiment folder."""
    digest = hashlib.sha256(str(path.expanduser().resolve()).encode()).hexdigest()[:6]
    return f"{dataset_slug(path.name or str(path))}-{digest}"


def of_dataset(folders: list[Path], dataset: str) -> list[Path]:
    """The experiment folders of ``dataset``: a name as experiment.json records it, or a path (its basename
    is the recorded name; among several, the folder named after the path or recording its place)."""
    path = Path(dataset).expanduser()
    own = f"_{path_slug(path)}"

    def named(folder: Path) -> bool:
        doc = read_json_object(folder / EXPERIMENT_FILE) or {}
        record = doc.get("dataset")
        return isinstance(record, dict) and record.get("name") in (dataset, dataset_slug(dataset))

    found = [f for f in folders if f.name.endswith(own) or named(f)]
    if len(found) > 1 and path.exists():
        def placed(folder: Path) -> bool:
            doc = read_json_object(folder / EXPERIMENT_FILE) or {}
            where = dataset_location(doc.get("dataset") or {})
            return folder.name.endswith(own) or (where is not None and same_place(where, dataset))
        found = [f for f in found if placed(f)]
    return found


def find_folder(output_dir: Path, dataset: str | None = None, experiment: str | None = None) -> Path:
    """The experiment folder under ``output_dir`` (or ``output_dir`` itself if it is one): see
    ExperimentStore.find."""
    if (output_dir / EXPERIMENT_FILE).exists():
        return output_dir
    if not output_dir.is_dir():
        raise NoExperimentError(f"output folder {output_dir} does not exist", hint="start with `ablate run`")
    docs = {child: doc for child in sorted(output_dir.iterdir())
            if (doc := read_json_object(child / EXPERIMENT_FILE)) is not None}
    found = list(docs)
    if experiment is not None:
        found = [c for c in found if c.name == experiment] or [c for c in found
                                                               if docs[c].get("experiment") == experiment]
    if dataset is not None:
        found = of_dataset(found, dataset)
    if len(found) == 1:
        return found[0]
    what = "".join(f" {flag} {v}" for flag, v in (("--experiment", experiment), ("--dataset", dataset)) if v)
    if not found:
        listed = ", ".join(c.name for c in docs)
        where = f"; experiments there: {listed}" if listed and what else ""
        raise NoExperimentError(f"no experiment{' for' + what if what else ''} in {output_dir}{where}",
                              hint="start one with `ablate run`")
    names = ", ".join(p.name for p in found)
    raise ExperimentError(f"several experiments in {output_dir}{' for' + what if what else ''}: {names}",
                          hint=f"pick one with --experiment NAME, e.g. --experiment {found[0].name}")
