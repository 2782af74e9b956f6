"""The MLP protocol: best-epoch restore, reproducibility, metrics, sanity against scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ablation_cli.training import standardise, trainer
from ablation_cli.training.columns import ColumnView
from ablation_cli.training.metrics import aggregate, classification_metrics, per_class_and_confusion
from ablation_cli.training.split import make_split
from ablation_cli.training.trainer import TrainParams, prepare, train_run

SMALL = TrainParams(hidden_dim=32, num_hidden_layers=2, dropout=0.3, max_epochs=40, patience=5, batch_size=16)


def blobs(n=240, dim=20, classes=3, sep=1.0, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    centers = rng.normal(size=(classes, dim)) * sep
    x = centers[labels] + rng.normal(size=(n, dim))
    return x.astype(np.float32), labels.astype(np.int64)


def prepared(n=240, sep=1.0):
    x, y = blobs(n=n, sep=sep)
    split = make_split(y, 0.7, 0.1, 0.2, seed=42, stratify=True)
    return prepare(x, y, split, 3, torch.device("cpu")), x, y, split


def without_time(result):
    return {k: v for k, v in result.items() if k != "train_time_s"}


def test_best_epoch_weights_are_restored_not_the_last():
    data, *_ = prepared(sep=0.6)
    result = train_run(data, TrainParams(hidden_dim=64, num_hidden_layers=2, dropout=0.0, lr=3e-3,
                                         max_epochs=60, patience=8, batch_size=16), seed=3)
    curve = result["learning_curve"]["val_acc"]
    best = result["best_epoch"]
    assert result["epochs_run"] == len(curve) == best + 8  # stopped by patience
    assert curve[-1] < curve[best - 1]  # the last epoch is worse than the best...
    assert result["metrics"]["val_acc"] == curve[best - 1]  # ...and the best is evaluated
    assert max(curve) == curve[best - 1] and curve.index(max(curve)) == best - 1


def test_a_run_depends_only_on_its_seed():
    data, *_ = prepared()
    alone = train_run(data, SMALL, seed=43)
    train_run(data, SMALL, seed=42)  # another run in between changes nothing
    torch.manual_seed(999)
    after = train_run(data, SMALL, seed=43)
    assert without_time(after) == without_time(alone)
    other = train_run(data, SMALL, seed=44)
    assert other["learning_curve"] != alone["learning_curve"]


def test_learning_curves_and_records():
    data, *_ = prepared()
    r = train_run(data, SMALL, seed=1)
    assert set(r["learning_curve"]) == {"train_loss", "val_loss", "val_acc", "lr"}
    assert all(len(v) == r["epochs_run"] for v in r["learning_curve"].values())
    assert r["feature_dim"] == 20 and r["device"] == "cpu"
    assert np.array(r["confusion_matrices"]["test"]).sum() == 48
    assert set(r["metrics"]) >= {"train_acc", "val_acc", "test_acc", "test_f1_macro", "test_top2_acc",
                                 "test_log_loss", "val_precision_macro", "test_recall_macro"}


def test_accuracy_close_to_logistic_regression():
    from sklearn.linear_model import LogisticRegression

    data, x, y, split = prepared(n=600, sep=0.5)
    accs = [train_run(data, SMALL, seed=s)["metrics"]["test_acc"] for s in (1, 2, 3)]
    lr = LogisticRegression(max_iter=2000).fit(x[split.train], y[split.train])
    baseline = lr.score(x[split.test], y[split.test])
    assert baseline > 0.6
    assert abs(np.mean(accs) - baseline) < 0.08


def test_metrics_are_scikit_learns():
    y = np.array([0, 0, 1, 1, 2, 2])
    proba = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.1, 0.8, 0.1], [0.1, 0.3, 0.6],
                      [0.1, 0.2, 0.7], [0.6, 0.3, 0.1]])
    m = classification_metrics(y, proba, 3, "test")
    assert m["test_acc"] == pytest.approx(3 / 6)
    assert m["test_f1_macro"] == pytest.approx(0.5)
    assert m["test_top2_acc"] == pytest.approx(5 / 6)
    assert m["test_log_loss"] == pytest.approx(-np.mean(np.log([0.8, 0.2, 0.8, 0.3, 0.7, 0.1])))
    d = per_class_and_confusion(y, proba, 3)
    assert d["confusion_matrix"] == [[1, 1, 0], [0, 1, 1], [1, 0, 1]]
    assert d["per_class"]["recall"] == [0.5, 0.5, 0.5]


def test_aggregate_t_interval():
    agg = aggregate([0.5, 0.6, 0.7])
    assert agg["mean"] == pytest.approx(0.6)
    assert agg["std"] == pytest.approx(np.std([0.5, 0.6, 0.7]))
    assert agg["ci95"] == pytest.approx(4.302652729911275 * 0.1 / np.sqrt(3))
    assert aggregate([0.4]) == {"mean": 0.4, "std": 0.0, "ci95": None}  # one run: no CI at all
    # identical runs: exactly 0, not numpy's ~1e-17 of rounding
    assert aggregate([0.3375] * 3) == {"mean": 0.3375, "std": 0.0, "ci95": 0.0}


def test_split_is_stratified_and_fixed():
    y = np.repeat(np.arange(4), 25)
    a = make_split(y, 0.7, 0.1, 0.2, seed=42, stratify=True)
    b = make_split(y, 0.7, 0.1, 0.2, seed=42, stratify=True)
    assert all(np.array_equal(p, q) for p, q in zip((a.train, a.val, a.test), (b.train, b.val, b.test)))
    assert (len(a.train), len(a.val), len(a.test)) == (70, 10, 20)
    assert np.bincount(y[a.test]).tolist() == [5, 5, 5, 5]
    assert not set(a.train) & set(a.test)


# -- several runs trained together ---------------------------------------------------------------

def test_runs_trained_together_equal_runs_trained_alone():
    from ablation_cli.training.trainer import train_runs

    data, *_ = prepared()
    seeds = [3, 4, 5, 6]
    alone = [without_time(train_run(data, SMALL, seed=s)) for s in seeds]
    together = [without_time(r) for r in train_runs(data, SMALL, seeds)]
    assert together == alone  # bit for bit: curves, metrics, confusion matrices
    assert len({r["epochs_run"] for r in alone}) > 1  # runs stopped at different epochs


def test_runs_trained_together_each_report_their_share_of_the_wall_time():
    import time

    from ablation_cli.training.trainer import train_runs

    data, *_ = prepared()
    started = time.perf_counter()
    results = train_runs(data, SMALL, [3, 4, 5, 6])
    wall = time.perf_counter() - started
    times = [r["train_time_s"] for r in results]
    assert all(t > 0 for t in times)
    # the shares add up to the call's wall time (each used to be the whole chunk's: 4x too much)
    assert sum(times) <= wall
    assert sum(times) > 0.5 * wall
    assert len(results[0]["test_pred"]) == int(data.y["test"].shape[0])


def test_each_run_is_reported_the_moment_it_stops():
    from ablation_cli.training.trainer import train_runs

    data, *_ = prepared()
    events: list[tuple[str, int, int]] = []
    results = train_runs(data, SMALL, [3, 4, 5, 6],
                         on_epoch=lambda i, epoch, acc: events.append(("epoch", i, epoch)),
                         on_done=lambda i, result: events.append(("done", i, result["epochs_run"])))
    done = [e for e in events if e[0] == "done"]
    assert sorted(i for _, i, _ in done) == [0, 1, 2, 3]
    for _, i, epochs in done:
        assert epochs == results[i]["epochs_run"]
        later = events[events.index(("done", i, epochs)) + 1 :]
        assert all(e[1] != i for e in later)  # nothing of run i after it is reported done
    first = done[0]
    assert any(e[0] == "epoch" and e[2] > first[2] for e in events[events.index(first):])  # others went on


def test_stacked_batched_path_matches_per_run_training():
    """The CUDA algorithm (stacked weights, one batched matmul per layer, BatchNorm and dropout per run)
    computes the same training as per-run forward passes, up to float rounding."""
    from ablation_cli.training.trainer import train_runs

    data, *_ = prepared()
    seeds = [3, 4, 5]
    per_run = train_runs(data, SMALL, seeds, stacked=False)
    stacked = train_runs(data, SMALL, seeds, stacked=True)
    for a, b in zip(per_run, stacked):
        assert a["epochs_run"] == b["epochs_run"] and a["best_epoch"] == b["best_epoch"]
        np.testing.assert_allclose(a["learning_curve"]["val_loss"], b["learning_curve"]["val_loss"], rtol=1e-4)
        np.testing.assert_allclose(a["learning_curve"]["train_loss"], b["learning_curve"]["train_loss"], rtol=1e-4)
        assert a["metrics"]["test_acc"] == b["metrics"]["test_acc"]


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
@pytest.mark.parametrize("stacked", [False, True])
def test_mixed_precision_paths_train_to_the_same_accuracy(amp, stacked):
    """The autocast paths (meant for CUDA; fp16 with loss scaling) exercised on the CPU."""
    from dataclasses import replace

    from ablation_cli.training.trainer import train_runs

    data, *_ = prepared(sep=1.5)
    full = train_runs(data, SMALL, [3, 4], stacked=stacked)
    low = train_runs(data, replace(SMALL, amp=amp), [3, 4], stacked=stacked)
    for a, b in zip(full, low):
        assert all(np.isfinite(b["learning_curve"]["train_loss"]))
        assert abs(a["metrics"]["test_acc"] - b["metrics"]["test_acc"]) <= 0.1
        assert b["metrics"]["test_acc"] > 0.8


@pytest.mark.parametrize("columns", [1, 2, 3, 255, 256, 257, 258, 513, 1300])
def test_standardisation_is_bit_identical_to_numpy_a_block_of_columns_at_a_time(columns, monkeypatch):
    """The memory-light standardisation gives exactly numpy's train.mean(0), train.std(0) and (x - mean) / std
    of the whole split, whatever the block width (blocks of 2 and 256 columns here)."""
    rng = np.random.default_rng(columns)
    x = (rng.standard_normal((3001, columns)) * rng.uniform(0.1, 50, columns) + 7).astype(np.float32)
    x[:, 0] = 3.0  # a constant column: std 0 -> 1
    rows = rng.permutation(3001)[:2100]
    train = x[rows].astype(np.float64)
    want_mean, want_std = train.mean(axis=0), train.std(axis=0)
    want_std[want_std == 0] = 1.0
    want = ((x[rows] - want_mean) / want_std).astype(np.float32)
    for block_bytes in (8 * 2100 * 2, 8 * 2100 * 256):
        monkeypatch.setattr(standardise, "BLOCK_BYTES", block_bytes)
        mean, std = standardise._train_statistics(ColumnView.of(x), rows)
        assert np.array_equal(mean, want_mean) and np.array_equal(std, want_std)
        got = standardise._standardised(ColumnView.of(x), rows, mean, std)
        assert got.dtype == np.float32 and np.array_equal(got, want)
        lazy = standardise.StandardisedRows(ColumnView.of(x), rows, mean, std)  # what CPU training reads
        batch = torch.tensor([5, 0, 2099, 5])
        assert lazy.shape == (2100, columns) and np.array_equal(lazy[batch].numpy(), want[[5, 0, 2099, 5]])
        assert np.array_equal(lazy[100:1700].numpy(), want[100:1700])


def test_a_composite_column_view_gathers_exactly_the_concatenated_columns():
    """A layer selection of a composite (each unit's columns of each part, in order) read as a view equals
    the concatenated copy, for any rows and any block of columns; nothing is copied until asked."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((50, 6)).astype(np.float32), rng.standard_normal((50, 4)).astype(np.float32)
    # units u0 (a[:, 0:3], b[:, 0:2]) and u1 (a[:, 3:6], b[:, 2:4]); only u1 selected, then both
    only_u1 = ColumnView([(a, np.arange(3, 6), np.arange(0, 3)), (b, np.arange(2, 4), np.arange(3, 5))], 5)
    both = ColumnView([(a, np.arange(0, 6), np.array([0, 1, 2, 5, 6, 7])),
                       (b, np.arange(0, 4), np.array([3, 4, 8, 9]))], 10)
    for view, want in ((only_u1, np.concatenate([a[:, 3:6], b[:, 2:4]], axis=1)),
                       (both, np.concatenate([a[:, 0:3], b[:, 0:2], a[:, 3:6], b[:, 2:4]], axis=1))):
        assert view.whole is None and np.array_equal(view.array(), want)
        rows = np.array([7, 3, 49, 3])
        assert np.array_equal(view.take(rows), want[rows])
        assert np.array_equal(view.take(rows, 2, 4), want[rows, 2:4])
        assert np.array_equal(view.take(slice(10, 20), 1, 5), want[10:20, 1:5])
        split_rows = np.array([9, 0, 31, 2, 44, 17])
        mean, std = standardise._train_statistics(view, split_rows)
        lazy = standardise.StandardisedRows(view, split_rows, mean, std)  # torch gathers from each part
        copy = standardise._standardised(ColumnView.of(want), split_rows, mean, std)
        assert np.array_equal(lazy[torch.tensor([3, 0, 3, 5])].numpy(), copy[[3, 0, 3, 5]])
        assert np.array_equal(lazy[1:5].numpy(), copy[1:5])
    assert ColumnView.of(a).whole is a and ColumnView.of(a).array() is a


def test_batches_read_from_a_read_only_memory_map_equal_the_standardised_copy(tmp_path):
    """A spilled cache entry (flat_vec) is a read-only memory map: its batches are read with numpy, the
    same values as from memory, and training on it equals training on the array in memory, bit for bit."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((90, 12)).astype(np.float32)
    np.save(tmp_path / "f.npy", x)
    mapped = np.load(tmp_path / "f.npy", mmap_mode="r")
    assert not mapped.flags.writeable
    y = np.arange(90) % 3
    split = make_split(y, 0.7, 0.1, 0.2, 42, True)
    cpu = torch.device("cpu")
    on_disk, in_memory = prepare(mapped, y, split, 3, cpu), prepare(x, y, split, 3, cpu)
    assert torch.equal(on_disk.x["train"][torch.tensor([4, 1, 4])], in_memory.x["train"][torch.tensor([4, 1, 4])])
    params = TrainParams(hidden_dim=16, max_epochs=4, patience=10)
    a, b = train_run(on_disk, params, seed=5), train_run(in_memory, params, seed=5)
    assert a["learning_curve"] == b["learning_curve"] and a["metrics"] == b["metrics"]


class _Kept(trainer.RunStates):
    """Training states kept as the cell's files would be: saved through torch.save, read back from bytes."""

    def __init__(self) -> None:
        self.saved: dict[int, bytes] = {}

    def load(self, i):
        import io

        return torch.load(io.BytesIO(self.saved[i]), weights_only=True) if i in self.saved else None

    def save(self, i, state):
        import io

        buffer = io.BytesIO()
        torch.save(state, buffer)
        self.saved[i] = buffer.getvalue()


class _Cut(Exception):
    pass


@pytest.mark.parametrize("cut_at", [1, 7])
def test_a_run_cut_off_goes_on_from_its_state_and_ends_as_the_uninterrupted_run(cut_at):
    """Issue 26, item 4: a run longer than a Slurm time limit saves its training state and resumes from it;
    its result equals the uninterrupted run's, bit for bit (curves, metrics, predictions)."""
    from ablation_cli.training.trainer import train_runs

    data, *_ = prepared()
    params = TrainParams(hidden_dim=32, num_hidden_layers=2, dropout=0.3, max_epochs=40, patience=5, batch_size=16,
                         checkpoint_every_s=0.0)  # a state after every epoch
    seeds = [3, 4]
    whole = [without_time(r) for r in train_runs(data, params, seeds)]
    kept = _Kept()

    def cut(i, epoch, acc):
        if epoch == cut_at + 1 and i == 1:
            raise _Cut  # killed during epoch cut_at + 1: the state after epoch cut_at is on disk
    with pytest.raises(_Cut):
        train_runs(data, params, seeds, on_epoch=cut, states=kept)
    assert sorted(kept.saved) == [0, 1]
    epochs = {}

    def seen(i, epoch, acc):
        epochs.setdefault(i, epoch)
    resumed = [without_time(r) for r in train_runs(data, params, seeds, on_epoch=seen, states=kept)]
    assert epochs == {0: cut_at + 1, 1: cut_at + 1}  # went on from the saved epoch, not from the start
    assert resumed == whole
    assert all(r["epochs_run"] > cut_at + 1 for r in whole)
