"""Typed views of the experiment folder's JSON documents, as they are on disk.

Each record is read once, by ``from_json``, and keeps the raw document (``doc``) where a writer must
reproduce it byte for byte. The metric payload (``metrics``, a cell's ``*_mean``) stays a mapping: it is
the researcher's open schema. A cell with no ``classifier`` key trains the MLP: :attr:`CellSpec.classifier_name`
and :attr:`CellCheckpoint.classifier_name` say so, and nothing else spells the rule.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict

from ablation_cli.errors import ConfigError

DEFAULT_CLASSIFIER = "mlp"
FINGERPRINT_KEYS = ("fingerprint", "config", "dataset", "code")
FINGERPRINT_PARTS = ("config", "dataset", "code")


def _object(value: object) -> Mapping[str, Any]:
    """``value`` if it is a JSON object, else an empty one (a document written by an older version)."""
    return value if isinstance(value, Mapping) else {}


def classifier_name(classifier: str | None) -> str:
    """The classifier a cell trains: its own, or the default grid's MLP when it names none."""
    return classifier or DEFAULT_CLASSIFIER


def dataset_location(record: Mapping[str, Any]) -> str | None:
    """Where a dataset record (experiment.json's ``dataset``) says its data lives: a path or a hub id."""
    details = record.get("details")
    if not isinstance(details, Mapping):
        return None
    where = details.get("path") or details.get("source")
    return str(where) if where else None


def same_place(a: str, b: str) -> bool:
    return a == b or Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def same_dataset(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> bool:
    """Whether experiment.json's dataset record and this run's are one dataset: the same name, and the
    same kind and fingerprint or the same place (a dataset edited in place stays itself; its cells go
    stale as before). A dataset with no place (demo) is itself by name and kind."""
    if recorded.get("name") != current.get("name"):
        return False
    if recorded.get("kind") == current.get("kind") and recorded.get("fingerprint") == current.get("fingerprint"):
        return True
    here, there = dataset_location(recorded), dataset_location(current)
    if here is None and there is None:
        return recorded.get("kind") == current.get("kind")
    return here is not None and there is not None and same_place(here, there)


def describe_record(record: Mapping[str, Any]) -> str:
    """A dataset record in a few words: ``'hf_dataset' (hf, /data/a/hf_dataset)``."""
    where = dataset_location(record)
    return f"'{record.get('name')}' ({record.get('kind')}{', ' + where if where else ''})"


@dataclass(frozen=True)
class Fingerprint:
    """What a cell is made under: the digest and the parts it is computed from (``config``, ``dataset``,
    ``code``), as experiment.json's cell entries and every checkpoint's ``meta`` carry them."""

    fingerprint: str | None
    config: Mapping[str, Any] = field(default_factory=dict)
    dataset: Mapping[str, Any] = field(default_factory=dict)
    code: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> Fingerprint:
        fp = doc.get("fingerprint")
        return cls(fp if isinstance(fp, str) else None, _object(doc.get("config")),
                   _object(doc.get("dataset")), _object(doc.get("code")))

    def part(self, name: str) -> Mapping[str, Any]:
        return {"config": self.config, "dataset": self.dataset, "code": self.code}[name]

    def to_json(self) -> dict[str, object]:
        return {"fingerprint": self.fingerprint, "config": self.config, "dataset": self.dataset, "code": self.code}

    def changes(self, new: Fingerprint) -> list[str]:
        """Human-readable changed fields from this fingerprint's parts to ``new``'s: ``dropout: 0.3 -> 0.5``."""
        out = []
        for name in FINGERPRINT_PARTS:
            a, b = self.part(name), new.part(name)
            for key in sorted(set(a) | set(b)):
                if a.get(key) != b.get(key):
                    out.append(f"{key}: {a.get(key, '(none)')} -> {b.get(key, '(none)')}")
        return out


@dataclass(frozen=True)
class Meta:
    """A checkpoint's ``meta``: its seal, what it was made under, and where its numbers come from."""

    fingerprint: Fingerprint
    schema_version: object = None
    checksum: object = None
    provenance: str | None = None
    versions: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> Meta:
        provenance = doc.get("provenance")
        return cls(Fingerprint.from_json(doc), doc.get("schema_version"), doc.get("checksum"),
                   provenance if isinstance(provenance, str) else None, _object(doc.get("versions")))

    @property
    def imported(self) -> bool:
        """Numbers the original script wrote, brought in by ``ablate import``."""
        return self.provenance == "imported"

    @property
    def torch_threads(self) -> int | None:
        threads = self.versions.get("torch_threads")
        return int(threads) if threads else None


@dataclass(frozen=True)
class CellSpec:
    """One cell of experiment.json's ``cells``: its name and the fingerprint its checkpoints must carry."""

    id: str
    layer_config: str
    representation: str
    classifier: str | None  # None: no classifier axis (the id names none; it trains the MLP)
    expected: Fingerprint
    num_layers: int | None = None
    axes: Mapping[str, Any] = field(default_factory=dict)  # its ``[axes]`` values (dotted key: value)

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> CellSpec:
        layers = doc.get("num_layers")
        axes = doc.get("axes")
        return cls(doc["id"], doc["layer_config"], doc["representation"], doc.get("classifier"),
                   Fingerprint.from_json(doc), int(layers) if layers is not None else None,
                   dict(axes) if isinstance(axes, Mapping) else {})

    @property
    def classifier_name(self) -> str:
        return classifier_name(self.classifier)


@dataclass(frozen=True)
class Sources:
    """experiment.json's ``sources``: where a run's settings came from, what ``ablate run --resume`` replays."""

    config: str | None = None  # the config file
    datasets: str | None = None  # the datasets registry
    dataset: str | None = None  # a dataset given as a path
    dataset_options: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, doc: object) -> Sources:
        found = _object(doc)
        def text(key: str) -> str | None:
            return str(found[key]) if found.get(key) else None
        return cls(text("config"), text("datasets"), text("dataset"), _object(found.get("dataset_options")))

    def to_json(self) -> dict[str, object]:
        return {"config": self.config, "datasets": self.datasets, "dataset": self.dataset,
                "dataset_options": dict(self.dataset_options)}


@dataclass(frozen=True)
class Experiment:
    """experiment.json: the resolved config, the dataset record and each cell's expected fingerprint."""

    experiment: str
    dataset: Mapping[str, Any]
    num_runs: int
    cells: tuple[CellSpec, ...]
    layer_configs: Mapping[str, Mapping[str, Any]]
    config: Mapping[str, Any]
    imported: Mapping[str, Any] | None = None  # ``ablate import``'s source and protocol
    doc: Mapping[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> Experiment:
        imported = doc.get("imported")
        return cls(doc["experiment"], _object(doc.get("dataset")), int(doc["num_runs"]),
                   tuple(CellSpec.from_json(c) for c in doc["cells"]), _object(doc.get("layer_configs")),
                   _object(doc.get("config")), imported if isinstance(imported, Mapping) and imported else None,
                   doc)

    @property
    def dataset_name(self) -> str:
        return str(self.dataset["name"])

    @property
    def sources(self) -> Sources:
        return Sources.from_json(self.doc.get("sources"))

    @property
    def layer_counts(self) -> Mapping[str, Any]:
        """An imported experiment's layer counts, as the original script wrote them."""
        return _object(self.doc.get("layer_counts"))

    def dataset_layers(self) -> list[str]:
        """Every layer of the dataset: the all_layers config's, else the union of the configs' layers."""
        every = _object(self.layer_configs.get("all_layers")).get("layers")
        return every or sorted({name for lc in self.layer_configs.values() for name in lc["layers"]})

    def axis(self, name: str) -> list[str]:
        """The distinct values of one cell field in grid order (``representation``, ``layer_config``,
        ``classifier``: there the name each cell trains)."""
        pick = {"representation": lambda c: c.representation, "layer_config": lambda c: c.layer_config,
                "classifier": lambda c: c.classifier_name}[name]
        return list(dict.fromkeys(pick(c) for c in self.cells))

    def select(self, rep: str | None, layer_config: str | None, classifier: str | None,
               all_cells: bool, where: Mapping[str, str] | None = None) -> list[str]:
        """The ids of the cells ``ablate reset`` names (``--rep``, ``--layer-config``, ``--classifier``,
        ``--where KEY=VALUE`` on a swept setting, ``--all``); ConfigError for a name this experiment does
        not have."""
        if all_cells == (rep is not None or classifier is not None or bool(where)):
            raise ConfigError("give --rep NAME, --classifier NAME and/or --where KEY=VALUE, or --all")
        for flag, axis, value, what in (("--rep", "representation", rep, "representation"),
                                        ("--layer-config", "layer_config", layer_config, "layer config"),
                                        ("--classifier", "classifier", classifier, "classifier")):
            if value is not None and value not in (known := self.axis(axis)):
                raise ConfigError(f"{flag}: unknown {what} '{value}' (this experiment has: {', '.join(known)})")
        swept = list(dict.fromkeys(k for c in self.cells for k in c.axes))
        for key, value in (where or {}).items():
            if key not in swept:
                raise ConfigError(f"--where {key}={value}: '{key}' is not an axis of this experiment"
                                  f"{' (its axes: ' + ', '.join(swept) + ')' if swept else ' (it has no [axes])'}")
            if not any(key in c.axes and _same_value(c.axes[key], value) for c in self.cells):
                values = ", ".join(dict.fromkeys(axis_value_text(c.axes[key]) for c in self.cells if key in c.axes))
                raise ConfigError(f"--where {key}={value}: no cell has that value (values: {values})")
        return [c.id for c in self.cells
                if (all_cells or ((rep is None or c.representation == rep)
                                  and (classifier is None or c.classifier_name == classifier)
                                  and all(k in c.axes and _same_value(c.axes[k], v) for k, v in (where or {}).items())))
                and (layer_config is None or c.layer_config == layer_config)]

    def expected(self) -> dict[str, Fingerprint]:
        """Each cell's expected fingerprint, by cell id."""
        return {c.id: c.expected for c in self.cells}


@dataclass(frozen=True)
class RunCheckpoint:
    """checkpoints/runs/<cell>/run_<k>.json: one finished run."""

    run: int
    seed: int
    metrics: Mapping[str, Any]
    meta: Meta
    train_time_s: float = 0.0
    doc: Mapping[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> RunCheckpoint:
        return cls(int(doc["run"]), int(doc["seed"]), _object(doc["metrics"]), Meta.from_json(doc["meta"]),
                   float(doc.get("train_time_s", 0.0)), doc)


@dataclass(frozen=True)
class CellCheckpoint:
    """checkpoints/<cell>.json: a finished cell, its runs' results and their aggregates."""

    representation: str
    layer_config: str
    classifier: str | None
    num_runs: int
    per_run_results: Sequence[Mapping[str, Any]]
    meta: Meta
    test_acc_mean: float | None = None
    test_acc_std: float | None = None
    duration_s: float = 0.0
    doc: Mapping[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> CellCheckpoint:
        runs = doc["per_run_results"] or []
        return cls(doc["representation"], doc["layer_config"], doc.get("classifier"), doc["num_runs"],
                   [r for r in runs if isinstance(r, Mapping)], Meta.from_json(doc["meta"]),
                   doc.get("test_acc_mean"), doc.get("test_acc_std"), float(doc.get("duration_s", 0.0)), doc)

    @property
    def classifier_name(self) -> str:
        return classifier_name(self.classifier)

    @property
    def run_times(self) -> list[float]:
        return [float(r.get("train_time_s", 0.0)) for r in self.per_run_results]


class Intent(TypedDict):
    """A submission under way: the cells sent to sbatch, and since when (seconds since the epoch)."""

    cells: list[str]
    since: float


class Submission(TypedDict, total=False):
    """One entry of slurm/submissions.json: a submission's jobs, or (``submitting``) the intent of one."""

    submitting: Intent
    submitted_at: str
    features_job: str | None
    array_job: str | None
    cells: dict[str, str]  # cell id -> Slurm job id (``<array>_<task>``)
    logs: str


def as_pid(value: object) -> int | None:
    """A pid a file records, or None when it holds something else there."""
    if isinstance(value, int | float | str):
        try:
            return int(value)
        except ValueError:
            return None
    return None


@dataclass(frozen=True)
class Heartbeat:
    """progress/<cell>.json: who trains a cell now, and where it is."""

    host: object = None
    pid: object = None
    run: object = None
    epoch: object = None
    updated_ts: float = 0.0

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> Heartbeat:
        updated = doc.get("updated_ts", 0)
        return cls(doc.get("host"), doc.get("pid"), doc.get("run"), doc.get("epoch"),
                   float(updated) if isinstance(updated, int | float) else 0.0)


@dataclass(frozen=True)
class Failure:
    """failures/<cell>.json: the last error of a failed cell."""

    type: object = None
    message: object = None

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> Failure:
        return cls(doc.get("type"), doc.get("message"))


_PLAIN = re.compile(r"[A-Za-z0-9._+-]{1,24}")


def axis_value_text(value: Any) -> str:
    """A value as cell ids spell it: short, readable and safe on every filesystem (``3e-4``, ``0.5``,
    ``true``, ``bf16``), else ``h`` and 8 hex digits of its JSON."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e6:
        text = str(int(value))  # 0.0 -> 0
    elif isinstance(value, float):
        mantissa, _, exponent = f"{value:e}".partition("e")
        scientific = f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
        text = min(repr(value), scientific, key=len) if float(scientific) == value else repr(value)
    else:
        text = str(value)
    if _PLAIN.fullmatch(text) and text not in (".", ".."):
        return text
    return "h" + hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:8]


def _same_value(value: Any, text: str) -> bool:
    """Whether a cell's axis value is the one ``--where`` spells: ``3e-4`` and ``0.0003`` are one float."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            return float(text) == float(value)
        except ValueError:
            return False
    return text in (str(value), axis_value_text(value))


GRID_AXES = ("layer_config", "representation", "classifier")  # every grid's; [axes] adds swept settings


def cell_axes(cell: Mapping[str, Any]) -> dict[str, Any]:
    """A cell's coordinates on every axis of its grid (a results.json or status cell): layer config,
    representation, classifier (the default where the grid has no classifier axis), its [axes] values."""
    return {"layer_config": cell["layer_config"], "representation": cell["representation"],
            "classifier": classifier_name(cell.get("classifier")), **(cell.get("axes") or {})}
