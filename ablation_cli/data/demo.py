"""The embedded ``demo`` dataset: a deterministic synthetic zoo of SD1.5 LoRAs.

Each sample has the real topology (128 rank-1 factor matrices under attn1/attn2,
real shapes and names). A class signal is planted in the scale, tails and mean
of every matrix, stronger under attn2 (cross-attention reads the prompt, which
names the concept) than under attn1, so that a classifier does clearly better
than chance, below 100%, and worse on ``visual_only`` than on ``all_layers``:
the shape of the researcher's real results.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
from filelock import FileLock
from safetensors.numpy import save_file

from ablation_cli.data.folders import FolderSource
from ablation_cli.data.layers import sd15_layers
from ablation_cli.data.table import STREAM_BYTES, DatasetInfo, LoraStream, LoraTable, collect

GENERATOR_VERSION = 1
CLASS_NAMES = ("airplane", "bird", "car", "cat", "dog", "fish", "fruit", "ship", "snake", "vegetable")

# Strength of the planted class signal per attention kind, and per-sample noise.
_SIGNAL = {"attn1": 0.035, "attn2": 0.08}
_NOISE = 0.30


class DemoSource:
    def __init__(self, name: str = "demo", num_samples: int = 800, num_classes: int = 10, seed: int = 0,
                 cache_dir: Path | None = None):
        if not 2 <= num_classes <= len(CLASS_NAMES):
            raise ValueError(f"num_classes must be in [2, {len(CLASS_NAMES)}], got {num_classes}")
        self.name = name
        self.num_samples = num_samples
        self.num_classes = num_classes
        self.seed = seed
        self.cache_dir = cache_dir  # when set, the zoo is written there once and read back like real data

    def _params(self) -> dict[str, int]:
        return {
            "generator_version": GENERATOR_VERSION,
            "num_samples": self.num_samples,
            "num_classes": self.num_classes,
            "seed": self.seed,
        }

    def describe(self) -> DatasetInfo:
        params = self._params()
        fp = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]
        return DatasetInfo(
            name=self.name,
            kind="demo",
            fingerprint=fp,
            layers=tuple(s.name for s in sd15_layers()),
            num_samples=self.num_samples,
            details=params,
            shapes={s.name: tuple(s.shape) for s in sd15_layers()},
        )

    def folder(self) -> Path | None:
        if self.cache_dir is None:
            return None
        return self.cache_dir / "datasets" / f"{self.name}-{self.describe().fingerprint}"

    def load(self) -> LoraTable:
        return collect(self.stream(None))

    def stream(self, chunk_bytes: int | None = STREAM_BYTES) -> LoraStream:
        """Generate the zoo; with a cache_dir, read in chunks from a real diffusers-layout folder (written once)."""
        folder = self.folder()
        if folder is None:
            return LoraStream.of(self.generate())
        if not (folder / ".complete").exists():
            self._write(folder)
        inner = FolderSource(folder, name=self.name).stream(chunk_bytes)

        def finish() -> LoraTable:
            return dataclasses.replace(inner.table(), info=self.describe(), positions=None, stored_rows=None)

        return LoraStream(iter(inner), finish)

    def _write(self, folder: Path) -> None:
        """Write each LoRA as diffusers does (pytorch_lora_weights.safetensors + metadata.json), atomically:
        into a temp folder renamed into place, under a lock so concurrent runs write it once."""
        folder.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(folder) + ".lock"):
            if (folder / ".complete").exists():
                return
            for stale in folder.parent.glob(f".{folder.name}.*.tmp"):  # left by a killed writer
                shutil.rmtree(stale, ignore_errors=True)
            table = self.generate()
            tmp = folder.parent / f".{folder.name}.{os.getpid()}.tmp"
            for i, sid in enumerate(table.sample_ids):
                (tmp / sid).mkdir(parents=True)
                tensors = {}
                for layer in table.layers:
                    module, factor = layer.rsplit(".", 1)
                    tensors[f"unet.{module}.lora.{factor}.weight"] = np.ascontiguousarray(table.weights[layer][i])
                save_file(tensors, str(tmp / sid / "pytorch_lora_weights.safetensors"))
                label = table.label_names[table.labels[i]]
                (tmp / sid / "metadata.json").write_text(json.dumps({"category_label": label, "rank": 1}))
            with contextlib.suppress(FileNotFoundError):
                shutil.rmtree(folder)  # an incomplete earlier attempt
            os.replace(tmp, folder)
            (folder / ".complete").write_text(json.dumps(self._params()))

    def generate(self) -> LoraTable:
        info = self.describe()
        n, k = self.num_samples, self.num_classes
        rng = np.random.default_rng(self.seed)
        labels = rng.permutation(np.arange(n) % k).astype(np.int64)
        weights: dict[str, np.ndarray] = {}
        for index, spec in enumerate(sd15_layers()):
            lrng = np.random.default_rng([self.seed, index])
            beta = _SIGNAL["attn2" if ".attn2." in spec.name else "attn1"]
            class_scale, class_tail, class_shift = lrng.normal(size=(3, k))
            scale = np.exp(beta * class_scale[labels] + _NOISE * lrng.normal(size=n))
            tail = np.abs(0.8 * beta * class_tail[labels] + 0.1 * _NOISE * lrng.normal(size=n))
            shift = 0.5 * beta * class_shift[labels] + 0.5 * _NOISE * lrng.normal(size=n)
            out_dim, in_dim = spec.shape
            z = lrng.standard_normal((n, out_dim, in_dim), dtype=np.float32)
            h = lrng.standard_normal((n, out_dim, in_dim), dtype=np.float32)
            z *= np.exp(tail[:, None, None] * h).astype(np.float32)
            z += shift[:, None, None].astype(np.float32)
            # Down factors start random (~1/sqrt(in)); up factors grow from zero in training.
            base = 1.0 / np.sqrt(in_dim) if spec.name.endswith(".down") else 1e-3
            weights[spec.name] = (z * (base * scale)[:, None, None].astype(np.float32)).astype(np.float32)
        names = CLASS_NAMES[:k]
        ids = tuple(f"{self.name}-{i:05d}" for i in range(n))
        return LoraTable(info=info, weights=weights, labels=labels, label_names=names, sample_ids=ids)
