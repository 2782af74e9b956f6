"""The feature cache's JSON documents, key by key (:mod:`ablation_cli.features.cache` writes them)."""

from __future__ import annotations

from typing import NotRequired, Required, TypedDict


class IndexDoc(TypedDict):
    """``<dataset-key>/index.json``: what :class:`ablation_cli.workspace.DatasetIndex` needs, without weights."""

    dataset: str
    fingerprint: str
    labels: list[int]
    label_names: list[str]
    sample_ids: list[str]
    layers: list[str]
    shapes: dict[str, list[int]]  # layer -> (out, in)
    positions: list[int] | None
    stored_rows: NotRequired[int]  # absent from an index of an earlier ablate: then rebuilt


class EntryInfo(TypedDict, total=False):
    """What an entry's meta file records beside its digests: the dataset and the units of its columns."""

    dataset: Required[str]
    units: list[str]


class CacheEntryDoc(TypedDict):
    """One entry as ``ablate cache ls --json`` prints it."""

    dataset: str
    dataset_key: str
    representation: str
    version: int | str
    shape: list[int]
    bytes: int
    age_s: float
    created_at: str
    path: str
