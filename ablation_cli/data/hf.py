"""Hugging Face ``datasets`` sources: a ``save_to_disk`` folder or a hub id, one column per LoRA tensor.

Columns are read in bulk from Arrow (one vectorised conversion per tensor column, no per-row
Python loop), so a 100k-row dataset costs one pass over each column.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from ablation_cli.data.keys import key_style, parse_key
from ablation_cli.data.table import (
    STREAM_BYTES,
    DatasetInfo,
    LoraChunk,
    LoraStream,
    LoraTable,
    RowOptions,
    changed_options,
    collect,
    empty_weights,
)
from ablation_cli.durable import crash_point
from ablation_cli.errors import DataError, environment_or

log = logging.getLogger(__name__)

READ_THREADS = 4  # column copies in flight at once


def is_hf_folder(path: Path) -> bool:
    return path.is_dir() and any((path / f).exists() for f in ("dataset_info.json", "dataset_dict.json"))


def _import_datasets() -> Any:
    try:
        import datasets
    except ImportError:
        raise DataError("reading Hugging Face datasets needs the `datasets` package",
                        hint="pip install 'ablate[hf]'") from None
    return datasets


def _read_ahead(files: list[str], stop: threading.Event, chunk: int = 8 << 20) -> None:
    """Read the files sequentially in large chunks into the page cache, ahead of the memory-mapped
    copies. sendfile to /dev/null pulls the pages in without copying them to user space, so this
    costs next to nothing when the files are already cached."""
    try:
        sink = os.open(os.devnull, os.O_WRONLY)
    except OSError:
        return
    try:
        for name in files:
            fd = os.open(name, os.O_RDONLY)
            try:
                offset, size = 0, os.fstat(fd).st_size
                while offset < size and not stop.is_set():
                    sent = os.sendfile(sink, fd, offset, min(chunk, size - offset))
                    if sent <= 0:
                        break
                    offset += sent
            finally:
                os.close(fd)
    except OSError:
        return
    finally:
        os.close(sink)


def column_to_numpy(chunked: Any, name: str) -> np.ndarray:
    """An Arrow column of (nested, equal-shape) float lists -> (N, *shape) float32, in one pass."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if hasattr(chunked, "num_chunks"):
        arr = chunked.chunk(0) if chunked.num_chunks == 1 else chunked.combine_chunks()
    else:
        arr = chunked
    n = len(arr)
    if isinstance(arr.type, pa.ExtensionType):
        arr = arr.storage
    if arr.null_count:
        raise DataError(f"column {name}: {arr.null_count} row(s) have no value")
    dims = []
    while pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type) or pa.types.is_fixed_size_list(arr.type):
        if pa.types.is_fixed_size_list(arr.type):
            length = arr.type.list_size
        else:
            lengths = pc.list_value_length(arr)
            lo, hi = pc.min(lengths).as_py(), pc.max(lengths).as_py()
            if lo != hi:
                raise DataError(f"column {name}: rows have different shapes (lengths {lo} to {hi})")
            length = lo
        dims.append(length)
        arr = arr.flatten()
    try:  # a view into the memory-mapped Arrow buffer: pages come from the OS cache, not a copy
        values = arr.to_numpy(zero_copy_only=True)
    except (pa.ArrowInvalid, NotImplementedError):
        values = arr.to_numpy(zero_copy_only=False)
    values = values.astype(np.float32, copy=False)
    if not dims:
        dims = [1]
    return values.reshape(n, *dims)


def _record_batches(filename: str) -> Iterator[Any]:
    """The record batches of an Arrow stream file, as zero-copy views of a memory map whose pages are
    dropped from this process (MADV_DONTNEED; the page cache keeps them) once a batch is let go: the
    process holds about one batch of the file, whatever its size (a job's memory limit counts mapped pages)."""
    import mmap

    import pyarrow as pa

    with open(filename, "rb") as fh:
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        buf = pa.py_buffer(mm)
        src = pa.BufferReader(buf)
        reader = pa.ipc.open_stream(src)
        done = 0
        while True:
            try:
                batch = reader.read_next_batch()
            except StopIteration:
                break
            yield batch
            del batch
            pos = src.tell()
            start = done - done % mmap.PAGESIZE
            if pos > start:
                mm.madvise(mmap.MADV_DONTNEED, start, pos - start)
            done = pos
        del reader, src, buf
    finally:
        with contextlib.suppress(BufferError):  # a view still alive: the map goes when it does
            mm.close()


# The defaults of the options that decide which rows and labels are read (``DatasetInfo.options``).
ROW_OPTION_DEFAULTS: RowOptions = {"label_field": "category_label", "split": "train", "drop_nonfinite": False}


class HFDatasetSource:
    def __init__(self, ref: str | Path, name: str | None = None, label_field: str = "category_label",
                 split: str = "train", on_mismatch: str = "error", drop_nonfinite: bool = False, **_: Any) -> None:
        self.ref = ref
        self.name = name or Path(str(ref)).name
        self.label_field = label_field
        self.split = split
        self.drop_nonfinite = drop_nonfinite  # (on_mismatch: every row has every column; nothing to skip)

    @property
    def options(self) -> RowOptions:
        """The row options not at their defaults: the dataset's fingerprint (its Arrow data) knows none of them."""
        return changed_options({"label_field": self.label_field, "split": self.split,
                                "drop_nonfinite": self.drop_nonfinite}, ROW_OPTION_DEFAULTS)

    @cached_property
    def dataset(self) -> Any:
        datasets = _import_datasets()
        path = Path(str(self.ref)).expanduser()
        try:
            if path.exists():
                ds = datasets.load_from_disk(str(path))
            else:
                ds = datasets.load_dataset(str(self.ref), split=self.split)
        except DataError:
            raise
        except Exception as exc:
            where = "folder" if path.exists() else "Hugging Face hub id"
            raise environment_or(exc, DataError(f"cannot load {where} {self.ref} with `datasets` "
                                                f"({type(exc).__name__}: {exc})")) from None
        if isinstance(ds, datasets.DatasetDict):
            if self.split not in ds:
                raise DataError(f"{self.ref}: no split '{self.split}' (splits: {', '.join(ds)})")
            ds = ds[self.split]
        return ds

    @cached_property
    def _columns(self) -> dict[str, str]:
        """canonical layer -> column name."""
        cols = {}
        for col in self.dataset.column_names:
            parsed = parse_key(col)
            if parsed is not None and parsed.kind != "alpha":
                cols[parsed.layer] = col
        if not cols:
            raise DataError(f"no LoRA tensors found in {self.ref}: none of its {len(self.dataset.column_names)} "
                            f"columns ({', '.join(self.dataset.column_names[:3])}, ...) is a UNet attention LoRA key")
        if self.label_field not in self.dataset.column_names:
            raise DataError(f"{self.ref}: no label column '{self.label_field}' "
                            f"(columns: {', '.join(c for c in self.dataset.column_names if c not in cols.values())})",
                            hint="choose it with --label-field")
        return dict(sorted(cols.items()))

    def describe(self) -> DatasetInfo:
        ds = self.dataset
        if len(ds) == 0:
            raise DataError(f"empty dataset: {self.ref} has no rows")
        return DatasetInfo(name=self.name, kind="hf", fingerprint=str(ds._fingerprint),
                           layers=tuple(self._columns), num_samples=len(ds),
                           details={"source": str(self.ref), "layout": "hf",
                                    "key_style": key_style(list(self._columns.values())),
                                    "label_field": self.label_field, "drop_nonfinite": self.drop_nonfinite},
                           shapes=self._shapes, options=self.options)

    @cached_property
    def _shapes(self) -> dict[str, tuple[int, ...]]:
        """Each layer's matrix shape, from the first row (cheap)."""
        table = self.dataset.data
        return {layer: column_to_numpy(table.column(col).slice(0, 1), col).shape[1:]
                for layer, col in self._columns.items()}

    def load(self) -> LoraTable:
        """The whole dataset in memory (one chunk)."""
        return collect(self.stream(None))

    def stream(self, chunk_bytes: int | None = STREAM_BYTES) -> LoraStream:
        """Rows in chunks of about ``chunk_bytes`` of weights (None: one chunk). A plain on-disk dataset is
        read from its Arrow files record batch by record batch; one with an indices mapping (``select``,
        ``shuffle`` saved without ``flatten_indices``) column by column, whole."""
        info = self.describe()
        labels: list[Any] = []
        finite: list[np.ndarray] = []
        shapes: dict[str, tuple[int, ...]] = {}
        chunks = self._batches(chunk_bytes, labels, finite, shapes) if self._streamable() else \
            self._by_column(labels, finite, shapes)

        def finish() -> LoraTable:
            return self._checked(info, labels, np.concatenate(finite) if finite else np.ones(0, bool), shapes)

        return LoraStream(chunks, finish)

    def _checked(self, info: DatasetInfo, raw: list[Any], finite: np.ndarray,
                 shapes: dict[str, tuple[int, ...]]) -> LoraTable:
        """After every row was read: the dataset's verdict (a DataError) or its rows (no weights)."""
        if len(raw) != info.num_samples:
            raise DataError(f"{self.ref}: its Arrow files hold {len(raw)} rows, the dataset says {info.num_samples}")
        if any(v is None for v in raw):
            raise DataError(f"{self.ref}: {sum(v is None for v in raw)} row(s) have no '{self.label_field}'")
        if not finite.all():
            bad = np.flatnonzero(~finite)
            if not self.drop_nonfinite:
                raise DataError(f"{len(bad)} LoRAs (rows {', '.join(map(str, bad[:3]))}) contain NaN or Inf weights",
                                hint="drop them with --drop-nonfinite")
            log.warning("dropped %d LoRAs with NaN/Inf weights (rows %s)", len(bad), bad[:3].tolist())
            raw = [v for v, ok in zip(raw, finite) if ok]
            if not raw:
                raise DataError(f"empty dataset: no usable LoRAs in {self.ref}")
        names = self._label_names(raw)
        index = {v: i for i, v in enumerate(sorted(set(raw), key=lambda v: (isinstance(v, str), v)))}
        labels = np.array([index[v] for v in raw], dtype=np.int64)
        ids = tuple(f"{self.name}-{i:06d}" for i in np.flatnonzero(finite))
        kept = dataclasses.replace(info, num_samples=len(raw))
        dropped = not finite.all()
        return LoraTable(info=kept, weights=empty_weights(shapes), labels=labels, label_names=names, sample_ids=ids,
                         positions=np.flatnonzero(finite) if dropped else None, stored_rows=len(finite))

    def _streamable(self) -> bool:
        """A plain on-disk dataset (no index mapping): its Arrow files can be streamed batch by batch."""
        ds = self.dataset
        return bool(ds.cache_files) and getattr(ds, "_indices", None) is None

    def _batches(self, chunk_bytes: int | None, labels: list[Any], finite: list[np.ndarray],
                 shapes: dict[str, tuple[int, ...]]) -> Iterator[LoraChunk]:
        """The Arrow files, record batch by record batch (sliced to ``chunk_bytes``), copied into a chunk.

        Batches are zero-copy views of the memory-mapped file whose pages are dropped from the process
        once the batch is copied (:func:`_record_batches`), so memory holds one record batch plus one chunk."""

        n, columns = len(self.dataset), self._columns
        files = [entry["filename"] for entry in self.dataset.cache_files]
        stop = threading.Event()
        ahead = threading.Thread(target=_read_ahead, args=(files, stop), daemon=True)
        ahead.start()  # large sequential reads fill the page cache ahead of the memory-mapped copies
        row = 0

        def copy_column(batch: Any, layer: str, col: str, out: dict[str, np.ndarray]) -> np.ndarray:
            """Copy one column of a batch into the chunk; True per row where it is finite."""
            values = column_to_numpy(batch.column(col), col)
            if values.shape[1:] != shapes[layer]:
                raise DataError(f"column {col}: rows have different shapes")
            out[layer] = np.array(values, dtype=np.float32)  # a copy: the batch's buffers are let go
            flat = out[layer].reshape(len(values), -1)  # NaN/Inf * 0 is NaN, finite * 0 is 0: one BLAS pass
            return np.isfinite(flat @ np.zeros(flat.shape[1], np.float32))

        # Columns are copied by a few threads (numpy releases the GIL).
        try:
            with ThreadPoolExecutor(max_workers=READ_THREADS) as pool:
                for entry in self.dataset.cache_files:
                    for whole in _record_batches(entry["filename"]):
                        if not shapes:
                            for layer, col in columns.items():
                                shapes[layer] = column_to_numpy(whole.column(col).slice(0, 1), col).shape[1:]
                        row_bytes = 4 * sum(int(np.prod(s)) for s in shapes.values())
                        step = whole.num_rows if chunk_bytes is None else max(1, chunk_bytes // row_bytes)
                        for lo in range(0, whole.num_rows, step):
                            batch = whole.slice(lo, step)
                            weights: dict[str, np.ndarray] = {}
                            ok = np.ones(batch.num_rows, dtype=bool)
                            for good in pool.map(lambda lc, b=batch, w=weights: copy_column(b, lc[0], lc[1], w),
                                                 columns.items()):
                                ok &= good
                            finite.append(ok)
                            labels.extend(batch.column(self.label_field).to_pylist())
                            row += batch.num_rows
                            log.info("  read %d/%d rows", row, n)
                            crash_point("load")
                            weights = {k: v if ok.all() else v[ok] for k, v in sorted(weights.items())}
                            del batch  # only the chunk's copy is alive while the consumer works on it
                            yield LoraChunk(weights)
                            del weights
                        del whole  # let the batch go before the next is read
        finally:
            stop.set()

    def _rows(self) -> np.ndarray | None:
        """The dataset's indices mapping (after ``select``, ``shuffle``, ``filter`` saved without
        ``flatten_indices``): row i of the dataset is row ``rows[i]`` of its Arrow table. None: no mapping."""
        indices = getattr(self.dataset, "_indices", None)
        return None if indices is None else indices.column(0).to_numpy()

    def _column(self, name: str) -> list[Any]:
        """A non-tensor column, in the dataset's row order."""
        values = self.dataset.data.column(name).to_pylist()
        rows = self._rows()
        return values if rows is None else [values[i] for i in rows]

    def _by_column(self, labels: list[Any], finite: list[np.ndarray],
                   shapes: dict[str, tuple[int, ...]]) -> Iterator[LoraChunk]:
        """A dataset with an indices mapping: each tensor column read whole, in the dataset's row order (one chunk)."""
        table, rows = self.dataset.data, self._rows()
        weights = {}
        for i, (layer, col) in enumerate(self._columns.items(), start=1):
            values = column_to_numpy(table.column(col), col)
            weights[layer] = values if rows is None else values[rows]
            shapes[layer] = weights[layer].shape[1:]
            if i % 32 == 0 or i == len(self._columns):
                log.info("  read %d/%d tensor columns", i, len(self._columns))
        ok = np.ones(len(self.dataset), dtype=bool)
        for w in weights.values():
            ok &= np.isfinite(w).reshape(len(ok), -1).all(axis=1)
        finite.append(ok)
        labels.extend(self._column(self.label_field))
        yield LoraChunk({k: v if ok.all() else v[ok] for k, v in weights.items()})

    def _label_names(self, raw: list[Any]) -> tuple[str, ...]:
        """Sorted label values; int labels take their names from ``category_name`` when it maps 1:1."""
        values = sorted(set(raw), key=lambda v: (isinstance(v, str), v))
        if values and all(isinstance(v, int) for v in values) and "category_name" in self.dataset.column_names:
            pairs = set(zip(self._column(self.label_field), self._column("category_name")))
            mapping = dict(pairs)
            if len(mapping) == len(pairs) and len(set(mapping.values())) == len(mapping):
                return tuple(str(mapping[v]) for v in values)
        return tuple(str(v) for v in values)
