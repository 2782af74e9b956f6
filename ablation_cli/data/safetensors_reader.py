"""A safetensors reader for folders of LoRA files: each file read whole, its LoRA tensors copied straight
into a chunk's preallocated rows. Only safetensors is read: pickle files are never loaded.

safetensors is simple (8-byte little-endian header length, a JSON header, raw little-endian data), and
reading it here lets every tensor be a zero-copy view: the library's numpy loader copies each tensor
into a new bytes object first. Headers are checked strictly (bounds, dtypes, sizes); any damage is a
DataError naming the file.
"""

from __future__ import annotations

import functools
import hashlib
import json
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open

from ablation_cli.data.alphas import AlphaConfig, metadata_config, module_alphas
from ablation_cli.data.keys import ParsedKey, parse_key
from ablation_cli.data.table import LoraChunk
from ablation_cli.durable import crash_point
from ablation_cli.errors import DataError, environment_or
from ablation_cli.progress import track

READ_THREADS = 8  # reads and large copies release the GIL: overlap them

# A file's status under a reader's layer layout (FileStatus.status), one int8 per file.
OK, OTHER_LAYERS, OTHER_SHAPES, NONFINITE = 0, 1, 2, 3

_DTYPES: dict[str, np.dtype[Any]] = {
    "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "F64": np.dtype("<f8"), "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"), "U8": np.dtype("u1"),
}
_MAX_HEADER = 100 * 2**20


@functools.lru_cache(maxsize=4096)
def _parse(key: str) -> ParsedKey | None:
    return parse_key(key)


def read_header(path: Path) -> tuple[dict[str, tuple[int, ...]], list[str]]:
    """Canonical layer -> matrix shape, and all keys, from the header alone."""
    try:
        with safe_open(str(path), framework="numpy") as fh:
            keys = list(fh.keys())
            shapes: dict[str, tuple[int, ...]] = {}
            for key in keys:
                parsed = _parse(key)
                if parsed is not None and parsed.kind != "alpha":
                    shape = tuple(fh.get_slice(key).get_shape())
                    shapes[parsed.layer] = (shape[0], int(np.prod(shape[1:])) if len(shape) > 1 else 1)
            return shapes, keys
    except Exception as exc:
        raise environment_or(exc, DataError(f"{path} is not a readable safetensors file "
                                            f"({type(exc).__name__}: {exc})")) from None


@dataclass(frozen=True)
class _Entry:
    layer: str | None  # canonical layer, or None for an alpha
    module: str
    key: str  # as the file spells it
    dtype: str
    start: int
    count: int
    rows: int


@dataclass(frozen=True)
class _Verdict:
    """A header's status under a reader's layout and, when its layers are float32, the runs of its body
    to copy: (source start, block column, length)."""

    status: int
    runs: list[tuple[int, int, int]] | None = None


@dataclass(frozen=True, eq=False)
class _Plan:
    """What to take from a file with one header: its LoRA tensors, the LoRA config in its metadata (diffusers),
    its verdict per reader layout and its modules' alphas per config."""

    entries: tuple[_Entry, ...]
    config: AlphaConfig | None = None
    verdicts: dict[str, _Verdict] = field(default_factory=dict)
    alphas: dict[tuple[AlphaConfig, bool], dict[str, float]] = field(default_factory=dict)

    def config_alphas(self, config: AlphaConfig, peft_keys: bool) -> dict[str, float]:
        """module -> alpha under ``config`` (cached: threads racing here compute the same value)."""
        known = self.alphas.get((config, peft_keys))
        if known is None:
            downs = [(e.key, e.module, e.rows) for e in self.entries if (e.layer or "").endswith(".down")]
            known = self.alphas[config, peft_keys] = module_alphas(config, downs, peft_keys)
        return known


_PLANS: dict[bytes, tuple[int, _Plan]] = {}


def _plan(header_bytes: bytes, body_len: int) -> _Plan:
    """What to take from a file with this header (cached: files from one tool share headers)."""
    cached = _PLANS.get(header_bytes)
    if cached is not None and cached[0] == body_len:
        return cached[1]
    header = json.loads(header_bytes)
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    plan = []
    for key, spec in header.items():
        if key == "__metadata__" or (parsed := _parse(key)) is None:
            continue
        dtype = _DTYPES.get(spec.get("dtype"))
        if dtype is None:
            raise ValueError(f"tensor {key}: unsupported dtype {spec.get('dtype')!r}")
        start, end = spec["data_offsets"]
        shape = [int(d) for d in spec["shape"]]
        count = 1
        for d in shape:
            count *= d
        if not 0 <= start <= end <= body_len or end - start != count * dtype.itemsize:
            raise ValueError(f"tensor {key}: data offsets {start}-{end} do not match shape {tuple(shape)} "
                             "or the file size (truncated?)")
        layer = None if parsed.kind == "alpha" else parsed.layer
        plan.append(_Entry(layer, parsed.module, key, spec["dtype"], start, count, shape[0] if shape else 1))
    if len(_PLANS) > 64:
        _PLANS.clear()
    _PLANS[header_bytes] = (body_len, _Plan(tuple(plan), metadata_config(header.get("__metadata__"))))
    return _PLANS[header_bytes][1]


def _open_safetensors(path: Path) -> tuple[bytes, memoryview, _Plan]:
    """Read a file whole; return its bytes, its data section and the plan of its LoRA tensors."""
    try:
        data = path.read_bytes()
        if len(data) < 8:
            raise ValueError("file shorter than the 8-byte header length")
        size = int.from_bytes(data[:8], "little")
        if not 2 <= size <= min(_MAX_HEADER, len(data) - 8):
            raise ValueError(f"header length {size} does not fit a {len(data)}-byte file")
        body = memoryview(data)[8 + size :]
        return data, body, _plan(data[8 : 8 + size], len(body))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise environment_or(exc, DataError(f"{path} is not a readable safetensors file "
                                            f"({type(exc).__name__}: {exc})")) from None


def _value(body: memoryview, e: _Entry) -> np.ndarray:
    value = np.frombuffer(body, dtype=_DTYPES[e.dtype], count=e.count, offset=e.start)
    if e.dtype == "BF16":  # bfloat16 is the top half of a float32
        value = (value.astype(np.uint32) << 16).view(np.float32)
    return value


class SafetensorsReader:
    """Files expected to hold the layers ``shapes``, read in chunks of rows by a few threads. Each row is
    one (total,) float32 block, each layer a view of its columns in canonical order. ``status`` (one of
    OK, OTHER_LAYERS, OTHER_SHAPES, NONFINITE per file) and ``alphas`` fill in as files are read.

    A module's alpha: its ``.alpha`` tensor (kohya), else the file's PEFT config (``configs``, one per
    file or None), else the LoRA config in the file's metadata (diffusers), else none (NaN)."""

    def __init__(self, paths: list[Path], shapes: dict[str, tuple[int, ...]],
                 configs: Sequence[AlphaConfig | None] | None = None) -> None:
        self.paths, self.shapes, self.configs = paths, shapes, configs
        self.offsets: dict[str, int] = {}
        self.total = 0
        for layer, shape in shapes.items():
            self.offsets[layer] = self.total
            self.total += int(np.prod(shape))
        self.status = np.zeros(len(paths), dtype=np.int8)
        self.alphas: dict[str, np.ndarray] = {}
        self._zeros = np.zeros(self.total, dtype=np.float32)  # a dot with it is NaN exactly when a row holds NaN/Inf
        self._lock = threading.Lock()
        self._layout = hashlib.sha256(repr(list(shapes.items())).encode()).hexdigest()  # what a verdict depends on

    def rows_per_chunk(self, chunk_bytes: int | None) -> int:
        """About ``chunk_bytes`` of weights per chunk (None: every file in one chunk)."""
        n = len(self.paths)
        return n if chunk_bytes is None else max(1, min(n, chunk_bytes // (4 * self.total)))

    def chunks(self, rows: int) -> Iterator[LoraChunk]:
        """Every file once, ``rows`` files a chunk, in order; a chunk's block allocated when reached."""
        n = len(self.paths)
        blocks: dict[int, np.ndarray] = {}

        def reads() -> Iterator[int]:  # row after row, in order
            for lo in range(0, n, rows):
                block = blocks[lo] = np.empty((min(rows, n - lo), self.total), dtype=np.float32)
                yield from pool.map(lambda i, b=block, lo=lo: self._read_into(i, b, i - lo),
                                    range(lo, lo + len(block)))

        with ThreadPoolExecutor(max_workers=READ_THREADS) as pool:
            for i in track(reads(), n, "LoRA files"):
                crash_point("load")
                lo = i - i % rows
                if i == min(n, lo + rows) - 1:
                    yield self._chunk(blocks.pop(lo), lo)

    def _verdict(self, plan: _Plan) -> _Verdict:
        """A header's verdict under this layout, kept in its plan: a plan lives as long as the verdicts it
        holds, so a verdict never outlives its header."""
        if (known := plan.verdicts.get(self._layout)) is not None:
            return known
        shapes = self.shapes
        found = {e.layer: e for e in plan.entries if e.layer is not None}
        if found.keys() != shapes.keys():
            result = _Verdict(OTHER_LAYERS)
        elif any((e.rows, e.count // max(e.rows, 1)) != shapes[layer] for layer, e in found.items()):
            result = _Verdict(OTHER_SHAPES)
        elif all(e.dtype == "F32" and e.start % 4 == 0 for e in found.values()):
            # F32 layers are runs of the body viewed as float32: copy maximal runs, usually one
            runs: list[tuple[int, int, int]] = []  # (source start, block column, length)
            for layer in shapes:
                src, dst, length = found[layer].start // 4, self.offsets[layer], found[layer].count
                if runs and runs[-1][0] + runs[-1][2] == src and runs[-1][1] + runs[-1][2] == dst:
                    runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + length)
                else:
                    runs.append((src, dst, length))
            result = _Verdict(OK, runs)
        else:
            result = _Verdict(OK)
        plan.verdicts[self._layout] = result  # threads racing here compute the same value
        return result

    def _read_into(self, i: int, block: np.ndarray, row: int) -> int:
        """File ``i`` into ``block[row]``; its status and alphas recorded."""
        _data, body, plan = _open_safetensors(self.paths[i])
        verdict = self._verdict(plan)
        self.status[i] = verdict.status
        if verdict.status == OK and verdict.runs is not None:
            flat = np.frombuffer(body, dtype="<f4", count=len(body) // 4)
            for src, dst, length in verdict.runs:
                block[row, dst : dst + length] = flat[src : src + length]
        elif verdict.status == OK:
            for e in plan.entries:
                if e.layer is not None:
                    start = self.offsets[e.layer]
                    block[row, start : start + e.count] = _value(body, e)
        if verdict.status == OK and not np.isfinite(np.dot(block[row], self._zeros)):  # NaN/Inf * 0 is NaN
            self.status[i] = NONFINITE
        tensors = {e.module: float(_value(body, e)[0]) for e in plan.entries if e.layer is None}
        peft = self.configs[i] if self.configs is not None else None
        if verdict.status == OK and (config := peft or plan.config) is not None:
            tensors = {**plan.config_alphas(config, peft_keys=peft is not None), **tensors}
        for module, alpha in tensors.items():
            if module not in self.alphas:
                with self._lock:
                    self.alphas.setdefault(module, np.full(len(self.paths), np.nan, dtype=np.float32))
            self.alphas[module][i] = alpha
        return i

    def _chunk(self, block: np.ndarray, lo: int) -> LoraChunk:
        """The good rows of a block read from file ``lo`` on, as layers and alphas."""
        ok = self.status[lo : lo + len(block)] == OK
        kept = block if ok.all() else block[ok]
        return LoraChunk({layer: kept[:, o : o + int(np.prod(self.shapes[layer]))].reshape(-1, *self.shapes[layer])
                          for layer, o in self.offsets.items()},
                         {m: a[lo : lo + len(block)][ok] for m, a in sorted(self.alphas.items())})
