"""A finished layer sweep read as a ranking: its ``only_*`` layer configs, best on validation first, for a
layer config derived from it (``drop_top``: every layer but those of the top k)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from ablation_cli.errors import ConfigError, ExperimentError
from ablation_cli.store import ExperimentStore


@dataclass(frozen=True)
class Ranked:
    layer_config: str
    layers: tuple[str, ...]
    val_acc: float


@dataclass(frozen=True)
class Ranking:
    """The ``only_*`` layer configs of the experiment in ``folder``, for ``representation``: the highest
    mean validation accuracy first, ties broken by the config's first layer name. ``digest`` changes
    when any of them is retrained (another seed, another setting): a config derived from it goes stale."""

    folder: str
    representation: str
    order: tuple[Ranked, ...]
    digest: str

    def top(self, k: int) -> tuple[Ranked, ...]:
        if k > len(self.order):
            raise ConfigError(f"drop_top = {k}: the ranking in {self.folder} has {len(self.order)} layer configs")
        return self.order[:k]


def read_ranking(folder: str | Path, representation: str) -> Ranking:
    """The ranking of a finished layer sweep (``[layer_sweep] mode = "alone"``); ConfigError naming what is
    missing when the folder is not one, or a cell of it is not finished."""
    try:
        store = ExperimentStore.find(Path(folder).expanduser())
        record = store.experiment()
    except ExperimentError as exc:
        raise ConfigError(f"ranked_by = {str(folder)!r}: {exc}") from None
    specs = [s for s in record.cells if s.layer_config.startswith("only_") and s.representation == representation
             and s.classifier_name == "mlp" and not s.axes]
    if not specs:
        raise ConfigError(f"ranked_by = {str(folder)!r}: no only_* layer config with representation "
                          f"{representation} (make the ranking with [layer_sweep] by = \"factor\", mode = \"alone\")")
    ranked, identity = [], []
    for spec in specs:
        cell = store.cell_state(spec.id, spec.expected, record.num_runs).cell()
        val = cell.doc.get("val_acc_mean") if cell is not None else None
        if cell is None or not isinstance(val, (int, float)):
            raise ConfigError(f"ranked_by = {str(folder)!r}: cell {spec.id} is not finished; finish the ranking "
                              "with `ablate run` first")
        layers = tuple(record.layer_configs[spec.layer_config]["layers"])
        ranked.append(Ranked(spec.layer_config, layers, float(val)))
        identity.append([spec.id, spec.expected.fingerprint, float(val)])
    order = tuple(sorted(ranked, key=lambda r: (-round(r.val_acc, 9), r.layers[0] if r.layers else r.layer_config)))
    digest = hashlib.sha256(json.dumps(sorted(identity)).encode()).hexdigest()[:16]
    return Ranking(str(store.root.resolve()), representation, order, digest)
