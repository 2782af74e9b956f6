"""A curated mutation audit: deliberate bugs that would change a number or a record without a crash, and
the tests that must fail on each (``make mutants``; docs/mutants.md has the last run and how to add one).

Each mutant is an exact snippet of a source file and its replacement. It is applied to a throwaway copy
of the repository (never to this working tree), and the named tests run there with ``pytest -x -q``,
importing the copy's ``ablation_cli`` (a guard plugin stops the run if they would import another one).
A mutant is *killed* when the tests fail, *survived* when they pass; a snippet that is no longer in its
file (or is in it more than once) is a *stale* mutation, to be updated with the code. Before the
mutants, the named tests run once on the unmutated copy: they must pass there.

    python scripts/mutants.py                  # all, two at a time; exit 1 if any survived or is stale
    python scripts/mutants.py --list           # the mutants and their tests
    python scripts/mutants.py plateau-mode-min f1-macro-weighted --jobs 1
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TOP_LEVEL_SKIPPED = {".venv", ".git", "results", ".feature_cache", "ablate.egg-info"}
SKIPPED_ANYWHERE = {"__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache"}
GUARD_EXIT = 9  # the tests would have imported an ablation_cli outside the copy
GUARD = f'''"""Loaded by scripts/mutants.py (pytest -p): the tests must import the mutated copy's ablation_cli."""
import os
from pathlib import Path

import pytest


def pytest_sessionstart(session):
    import ablation_cli

    root = Path(os.environ["ABLATE_MUTANT_ROOT"]).resolve()
    imported = Path(ablation_cli.__file__).resolve()
    if root not in imported.parents:
        pytest.exit(f"mutants: the tests import {{imported}}, not the copy in {{root}}", returncode={GUARD_EXIT})
'''

P, G = "tests/test_protocol.py", "tests/test_mutation_guards.py"
F = "tests/test_fingerprints.py"  # written with the fingerprint fixes of issue 24
S = "tests/test_statistics.py"  # the statistics of merge
GOLDEN = f"{P}::test_tiny_training_matches_the_golden_numbers"


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str  # relative to the repository
    before: str  # exact source text, found once in the file
    after: str
    tests: tuple[str, ...]  # pytest node ids or files that must fail on it (fastest first)
    why: str  # the bug it stands for


MUTANTS = [
    # -- the training protocol (trainer.py) --------------------------------------------------------
    Mutant("plateau-mode-min", "ablation_cli/training/trainer.py",
           'mode="max", factor=params.plateau_factor', 'mode="min", factor=params.plateau_factor',
           (f"{P}::test_lr_halves_only_after_plateau_patience_epochs_without_a_better_val_acc",
            GOLDEN),
           "ReduceLROnPlateau treats validation accuracy as a loss"),
    Mutant("plateau-patience-of-early-stopping", "ablation_cli/training/trainer.py",
           "patience=params.plateau_patience)", "patience=params.patience)",
           (f"{P}::test_lr_halves_only_after_plateau_patience_epochs_without_a_better_val_acc", GOLDEN),
           "the schedule waits for the early-stopping patience"),
    Mutant("plateau-factor-ignored", "ablation_cli/training/trainer.py",
           "factor=params.plateau_factor,", "factor=0.1,",
           (f"{P}::test_lr_halves_only_after_plateau_patience_epochs_without_a_better_val_acc", GOLDEN),
           "the lr is cut by a fixed factor, not plateau_factor"),
    Mutant("statistics-of-all-rows", "ablation_cli/training/standardise.py",
           "mean, std = _train_statistics(view, split.train)",
           "mean, std = _train_statistics(view, np.arange(view.shape[0]))",
           (f"{P}::test_standardisation_statistics_come_from_the_train_rows_only",
            GOLDEN),
           "standardisation fitted on every row: the test set leaks into training"),
    Mutant("statistics-sample-std", "ablation_cli/training/standardise.py",
           "var[cols] = np.add.reduce(block, axis=0) / n", "var[cols] = np.add.reduce(block, axis=0) / (n - 1)",
           (f"{P}::test_standardisation_statistics_come_from_the_train_rows_only", GOLDEN),
           "standardised with the sample std (ddof 1) instead of numpy's population std"),
    Mutant("constant-column-not-guarded", "ablation_cli/training/standardise.py",
           "std[std == 0] = 1.0", "std[std == 0] = 0.0",
           (f"{P}::test_standardisation_statistics_come_from_the_train_rows_only",),
           "a constant feature divides by 0 (NaN features)"),
    Mutant("ties-keep-the-last-epoch", "ablation_cli/training/trainer.py",
           "if val_acc > self.best_acc:", "if val_acc >= self.best_acc:",
           (f"{P}::test_a_constructed_tie_keeps_the_first_epoch",
            f"{P}::test_the_first_of_tied_best_epochs_is_kept",
            GOLDEN),
           "a tie moves the best epoch to the last of the tied epochs"),
    Mutant("early-stopping-one-epoch-late", "ablation_cli/training/trainer.py",
           "return self.since_best >= patience", "return self.since_best > patience",
           (f"{P}::test_a_constructed_tie_keeps_the_first_epoch", f"{P}::test_the_first_of_tied_best_epochs_is_kept",
            GOLDEN),
           "early stopping waits patience + 1 epochs"),
    Mutant("best-weights-not-restored", "ablation_cli/training/trainer.py",
           "run.model.load_state_dict(run.best_state)", "run.model.train(False)",
           ("tests/test_trainer.py::test_best_epoch_weights_are_restored_not_the_last",),
           "the last epoch is evaluated instead of the best (the original script's bug)"),
    Mutant("best-weights-not-copied", "ablation_cli/training/trainer.py",
           "{k: v.detach().clone() for k, v in", "{k: v.detach() for k, v in",
           ("tests/test_trainer.py::test_best_epoch_weights_are_restored_not_the_last",),
           "the kept 'best' state aliases the live weights (the original script's bug)"),
    # -- the split (split.py) ----------------------------------------------------------------------------
    Mutant("val-split-not-stratified", "ablation_cli/training/split.py",
           "stratify=labels[rest] if stratify else None", "stratify=None",
           (f"{P}::test_the_validation_and_test_parts_are_stratified", GOLDEN),
           "the validation part ignores split.stratify"),
    Mutant("test-split-not-stratified", "ablation_cli/training/split.py",
           "stratify=labels if stratify else None", "stratify=None",
           ("tests/test_trainer.py::test_split_is_stratified_and_fixed",
            f"{P}::test_the_validation_and_test_parts_are_stratified"),
           "the test part ignores split.stratify"),
    Mutant("val-size-is-test-size", "ablation_cli/training/split.py",
           "rest, test_size=n_val,", "rest, test_size=n_test,",
           ("tests/test_trainer.py::test_split_is_stratified_and_fixed",),
           "the validation part gets the test part's size"),
    Mutant("original-split-val-test-swapped", "ablation_cli/training/split.py",
           '"val": temp[p2[n2:]], "test": temp[p2[:n2]]', '"val": temp[p2[:n2]], "test": temp[p2[n2:]]',
           ("tests/test_split.py",),
           "the original script's split with its validation and test parts exchanged"),
    # -- metrics (metrics.py) ----------------------------------------------------------------------------
    Mutant("f1-macro-weighted", "ablation_cli/training/metrics.py",
           '"f1_macro": skm.f1_score(y_true, y_pred, labels=labels, average="macro"',
           '"f1_macro": skm.f1_score(y_true, y_pred, labels=labels, average="weighted"',
           (f"{P}::test_macro_f1_precision_and_recall_on_unbalanced_classes",),
           "macro F1 averaged by support (equal on balanced test sets only)"),
    Mutant("precision-macro-weighted", "ablation_cli/training/metrics.py",
           '"precision_macro": skm.precision_score(y_true, y_pred, labels=labels, average="macro"',
           '"precision_macro": skm.precision_score(y_true, y_pred, labels=labels, average="weighted"',
           (f"{P}::test_macro_f1_precision_and_recall_on_unbalanced_classes",),
           "macro precision averaged by support"),
    Mutant("balanced-accuracy-is-accuracy", "ablation_cli/training/metrics.py",
           '"balanced_acc": skm.balanced_accuracy_score(', '"balanced_acc": skm.accuracy_score(',
           (f"{P}::test_macro_f1_precision_and_recall_on_unbalanced_classes",),
           "balanced accuracy reported as plain accuracy"),
    Mutant("ci-with-population-std", "ablation_cli/training/metrics.py",
           "arr.std(ddof=1) / np.sqrt(arr.size)", "arr.std() / np.sqrt(arr.size)",
           ("tests/test_trainer.py::test_aggregate_t_interval",),
           "the t-interval over runs uses the population std"),
    Mutant("ci-t-degrees-of-freedom", "ablation_cli/training/metrics.py",
           "stats.t.ppf(0.975, arr.size - 1)", "stats.t.ppf(0.975, arr.size)",
           ("tests/test_trainer.py::test_aggregate_t_interval",),
           "the t quantile with n instead of n - 1 degrees of freedom"),
    # -- statistics between layer configs (reports/tables.py) --------------------------------------------
    Mutant("cohens-d-weights-swapped", "ablation_cli/reports/tables.py",
           "((len(a) - 1) * va + (len(b) - 1) * vb)", "((len(b) - 1) * va + (len(a) - 1) * vb)",
           (f"{G}::test_cohens_d_pools_each_variance_with_its_own_degrees_of_freedom",),
           "the pooled sd weights each variance by the other group's degrees of freedom"),
    Mutant("welch-is-student", "ablation_cli/reports/tables.py",
           "stats.ttest_ind(a, b, equal_var=False)", "stats.ttest_ind(a, b, equal_var=True)",
           (f"{G}::test_cohens_d_pools_each_variance_with_its_own_degrees_of_freedom",),
           "Student's equal-variance t-test reported as Welch's"),
    Mutant("run-variance-population", "ablation_cli/reports/tables.py",
           "float(np.var(x, ddof=1))", "float(np.var(x))",
           (f"{G}::test_cohens_d_pools_each_variance_with_its_own_degrees_of_freedom",),
           "Cohen's d from population variances"),
    Mutant("drop-relative-to-the-second", "ablation_cli/reports/tables.py",
           '"drop_rel": drop / a["test_acc_mean"]', '"drop_rel": drop / b["test_acc_mean"]',
           ("tests/test_reports.py::test_welch_and_effect_size",),
           "the relative drop divided by the reduced layer config's accuracy"),
    # -- durable records (durable.py, store.py) -------------------------------------------------------------
    Mutant("checksum-skips-meta", "ablation_cli/durable.py",
           'return hashlib.sha256(_canonical({**doc, "meta": meta})).hexdigest()',
           'return hashlib.sha256(_canonical({k: v for k, v in doc.items() if k != "meta"})).hexdigest()',
           (f"{G}::test_editing_a_checkpoints_meta_makes_it_corrupt", f"{G}::test_read_sealed_rejects_an_edited_meta"),
           "a checkpoint's fingerprint record can be edited unseen"),
    Mutant("read-sealed-unchecked", "ablation_cli/durable.py",
           'return doc if doc["meta"].get("checksum") == checksum(doc) else None', "return doc",
           ("tests/test_durable.py::test_read_sealed_rejects_a_modified_document",),
           "sealed JSON read without checking its checksum"),
    Mutant("delete-before-replace", "ablation_cli/durable.py",
           'crash_point(f"write:{path.name}")\n',
           'path.unlink(missing_ok=True)\n        crash_point(f"write:{path.name}")\n',
           ("tests/test_durable.py::test_failed_write_keeps_the_old_file",),
           "an atomic write deletes the old file before the new one is in place"),
    Mutant("verify-skips-the-checksum", "ablation_cli/store.py",
           'if meta.get("checksum") != checksum(doc):', "if False:",
           ("tests/test_store.py::test_verify_detects_corruption",),
           "a modified checkpoint is accepted"),
    Mutant("verify-skips-the-fingerprint", "ablation_cli/store.py",
           'if expected is not None and meta.get("fingerprint") != expected["fingerprint"]:', "if False:",
           ("tests/test_store.py::test_verify_ok_missing_and_stale",),
           "a checkpoint made under another configuration is accepted"),
    Mutant("reset-keeps-the-failure", "ablation_cli/store.py",
           "paths = [self.cell_path(cell_id), self.failure_path(cell_id), self.progress_path(cell_id)]",
           "paths = [self.cell_path(cell_id), self.progress_path(cell_id)]",
           (f"{G}::test_reset_of_a_failed_cell_removes_its_failure_record",),
           "`ablate reset` leaves the failure record: status still shows the cell failed"),
    # -- kohya alpha (workspace.py) --------------------------------------------------------------------------
    Mutant("kohya-alpha-not-divided-by-rank", "ablation_cli/features/stream_pass.py",
           "alpha / down.shape[1]", "alpha",
           (f"{G}::test_kohya_rank4_scale_is_alpha_over_rank",),
           "kohya's scale taken as alpha, not alpha / r (equal at rank 1 with alpha 1)"),
    # -- fingerprints and the feature cache key (grid.py, features/cache.py: tests/test_fingerprints.py) -----
    Mutant("cache-key-without-drop_nonfinite", "ablation_cli/features/cache.py",
           '_ROW_OPTIONS = ("label_field", "on_mismatch", "drop_nonfinite", "split")',
           '_ROW_OPTIONS = ("label_field", "on_mismatch", "split")',
           (f"{F}::test_drop_nonfinite_is_in_the_feature_cache_key",),
           "features of a dataset read with and without drop_nonfinite share a cache entry"),
    Mutant("fingerprint-without-weight_decay", "ablation_cli/training/classifiers.py",
           'EXECUTION_ONLY = {"runs_in_parallel", "checkpoint_every_s"}',
           'EXECUTION_ONLY = {"runs_in_parallel", "checkpoint_every_s", "weight_decay"}',
           (f"{F}::test_each_config_field_changes_the_fingerprint_unless_declared_not_to_decide_numbers",),
           "a weight_decay change does not make cells stale"),
    Mutant("fingerprint-without-split-seed", "ablation_cli/grid.py",
           '"split_seed": cfg.split.seed,\n', "",
           (f"{F}::test_each_config_field_changes_the_fingerprint_unless_declared_not_to_decide_numbers",),
           "a split.seed change does not make cells stale"),
    Mutant("fingerprint-without-stratify", "ablation_cli/grid.py",
           '"stratify": cfg.split.stratify,\n', "",
           (f"{F}::test_each_config_field_changes_the_fingerprint_unless_declared_not_to_decide_numbers",),
           "a split.stratify change does not make cells stale"),
    # -- the statistics of merge (reports/statistics.py) --
    Mutant("holm-without-running-max", "ablation_cli/reports/statistics.py",
           "np.minimum(1.0, np.maximum.accumulate(p[order] * (m - np.arange(m))))",
           "np.minimum(1.0, p[order] * (m - np.arange(m)))",
           (f"{S}::test_holm_is_statsmodels_holm",), "Holm without its step-down maximum"),
    Mutant("bootstrap-p-one-sided", "ablation_cli/reports/statistics.py",
           "two_sided = 2.0 * min(", "two_sided = 1.0 * min(",
           (f"{S}::test_bootstrap_p_is_floored_at_one_over_b_and_capped_at_one",), "a one-sided p called two-sided"),
    Mutant("bootstrap-p-not-floored", "ablation_cli/reports/statistics.py",
           "return min(1.0, max(1.0 / resamples, two_sided))", "return min(1.0, two_sided)",
           (f"{S}::test_bootstrap_p_is_floored_at_one_over_b_and_capped_at_one",), "p = 0 from a bootstrap"),
    Mutant("unpaired-bootstrap", "ablation_cli/reports/statistics.py",
           "per_run = (counts @ correct[s.id]).astype(np.float64) / n",
           "per_run = ((counts[::-1] if s is members[-1] else counts) @ correct[s.id]).astype(np.float64) / n",
           ("tests/test_reports.py::test_golden_tables",),
           "one cell of a group gets other draws: its comparisons are no longer paired"),
    Mutant("best-on-test", "ablation_cli/reports/statistics.py",
           'best_doc = max(docs, key=lambda c: (round(float(c["val_acc_mean"]), 9), -docs.index(c)))',
           'best_doc = max(docs, key=lambda c: (round(float(c["test_acc_mean"]), 9), -docs.index(c)))',
           (f"{S}::test_the_best_cell_is_chosen_on_validation_never_on_test",), "the best chosen on test"),
    Mutant("chance-is-one-over-classes", "ablation_cli/reports/statistics.py",
           "majority = float(np.mean([np.bincount(p.true).max() / len(p.true) for p in preds]))",
           "majority = float(np.mean([1 / len(np.unique(p.true)) for p in preds]))",
           (f"{S}::test_chance_is_the_majority_class_rate_not_one_over_the_classes",),
           "chance as 1/C, not the majority rate"),
    Mutant("resampled-t-uncorrected", "ablation_cli/reports/statistics.py",
           "se = math.sqrt((1.0 / r + n_test / n_train) * float(np.var(d, ddof=1)))",
           "se = math.sqrt((1.0 / r) * float(np.var(d, ddof=1)))",
           (f"{S}::test_corrected_resampled_t_test_by_hand",), "the plain paired t-test on resampled splits"),
    Mutant("run-times-not-shared", "ablation_cli/training/trainer.py",
           "share = (time.perf_counter() - epoch_started) / len(active)",
           "share = time.perf_counter() - epoch_started",
           ("tests/test_trainer.py::test_runs_trained_together_each_report_their_share_of_the_wall_time",),
           "runs trained together each report the whole chunk's time"),
]


@dataclass
class Result:
    mutant: Mutant
    state: str  # killed, survived, stale, error
    detail: str
    seconds: float


def copy_repository(dest: Path) -> Path:
    """The working tree as it is now, without the virtualenv, git, results and caches."""
    def ignore(folder: str, names: list[str]) -> set[str]:
        top = Path(folder).resolve() == REPO
        return {n for n in names if n in SKIPPED_ANYWHERE or (top and n in TOP_LEVEL_SKIPPED)}

    shutil.copytree(REPO, dest, ignore=ignore)
    (dest / "_mutants_guard.py").write_text(GUARD)
    return dest


def pytest_command(tests: Iterable[str]) -> list[str]:
    return [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-p", "_mutants_guard", *tests]


def run_tests(copy: Path, tests: Iterable[str], timeout: float) -> tuple[int | None, str]:
    """pytest in ``copy``, importing the copy's ablation_cli (cwd and PYTHONPATH), one thread per process."""
    env = {**os.environ, "PYTHONPATH": str(copy), "PYTHONDONTWRITEBYTECODE": "1", "ABLATE_MUTANT_ROOT": str(copy),
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.pop("ABLATE_UPDATE_GOLDEN", None)  # a mutant must never rewrite a golden file (even in a copy)
    try:
        proc = subprocess.run(pytest_command(tests), cwd=copy, env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return None, out
    return proc.returncode, proc.stdout + proc.stderr


def first_failure(output: str) -> str:
    match = re.search(r"^(?:FAILED|ERROR) (\S+)", output, re.M)
    return match.group(1) if match else output.strip().splitlines()[-1] if output.strip() else ""


def stale_reason(m: Mutant) -> str | None:
    source = (REPO / m.path).read_text()
    count = source.count(m.before)
    if count == 1:
        return None
    return "snippet not found" if count == 0 else f"snippet found {count} times"


def run_mutant(m: Mutant, pristine: Path, work: Path, timeout: float) -> Result:
    started = time.perf_counter()
    copy = work / m.name
    shutil.copytree(pristine, copy)
    target = copy / m.path
    source = target.read_text()
    if source.count(m.before) != 1:  # the snapshot is what is tested: check it, not only the live file
        return Result(m, "stale", "snippet not in the copied source exactly once", time.perf_counter() - started)
    target.write_text(source.replace(m.before, m.after, 1))
    rc, output = run_tests(copy, m.tests, timeout)
    shutil.rmtree(copy, ignore_errors=True)
    elapsed = time.perf_counter() - started
    if rc is None:
        return Result(m, "killed", f"timed out after {timeout:.0f}s", elapsed)
    if rc in (1, 2):  # tests failed, or collection failed on the mutated code
        return Result(m, "killed", first_failure(output), elapsed)
    if rc == 0:
        return Result(m, "survived", "all named tests passed", elapsed)
    return Result(m, "error", f"pytest exit {rc}: {first_failure(output)}", elapsed)


def baseline(pristine: Path, mutants: list[Mutant], timeout: float) -> tuple[bool, str]:
    """Every named test passes on the unmutated copy (else a 'kill' means nothing)."""
    tests = list(dict.fromkeys(t for m in mutants for t in m.tests))
    rc, output = run_tests(pristine, tests, timeout)
    return rc == 0, first_failure(output) if rc is not None else f"timed out after {timeout:.0f}s"


def format_table(results: list[Result]) -> str:
    width = max(len(r.mutant.name) for r in results)
    lines = [f"{'mutant':<{width}}  {'file':<34} {'state':<8} {'s':>5}  killed by / why"]
    for r in results:
        lines.append(f"{r.mutant.name:<{width}}  {r.mutant.path.removeprefix('ablation_cli/'):<34} "
                     f"{r.state:<8} {r.seconds:5.1f}  {r.detail}")
    counts = {s: sum(r.state == s for r in results) for s in ("killed", "survived", "stale", "error")}
    lines.append(f"\n{len(results)} mutants: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="only these mutants (default: all)")
    parser.add_argument("--jobs", type=int, default=2, help="mutants tested at once (default 2)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per mutant's tests (default 300)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the run on the unmutated copy")
    parser.add_argument("--list", action="store_true", help="list the mutants and their tests, run nothing")
    args = parser.parse_args(argv)

    known = {m.name: m for m in MUTANTS}
    unknown = [n for n in args.names if n not in known]
    if unknown:
        parser.error(f"unknown mutant(s): {', '.join(unknown)} (known: {', '.join(known)})")
    chosen = [known[n] for n in args.names] if args.names else MUTANTS
    if args.list:
        for m in chosen:
            print(f"{m.name}  ({m.path}): {m.why}\n    {m.before!r}\n -> {m.after!r}\n"
                  f"    killed by: {', '.join(m.tests)}")
        return 0

    stale = [Result(m, "stale", reason, 0.0) for m in chosen if (reason := stale_reason(m)) is not None]
    live = [m for m in chosen if m.name not in {r.mutant.name for r in stale}]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ablate-mutants-") as tmp:
        pristine = copy_repository(Path(tmp) / "pristine")
        if live and not args.no_baseline:
            ok, detail = baseline(pristine, live, args.timeout * 2)
            if not ok:
                print(f"baseline: the named tests fail without any mutation ({detail}); fix them first")
                return 1
            print(f"baseline: the named tests pass on the unmutated copy ({time.perf_counter() - started:.0f}s)")
        work = Path(tmp) / "mutants"
        work.mkdir()
        results: dict[str, Result] = {r.mutant.name: r for r in stale}
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            for result in pool.map(lambda m: run_mutant(m, pristine, work, args.timeout), live):
                results[result.mutant.name] = result
                print(f"  {result.state:<8} {result.mutant.name} ({result.seconds:.1f}s)", flush=True)
    ordered = [results[m.name] for m in chosen]
    print()
    print(format_table(ordered))
    print(f"total {time.perf_counter() - started:.0f}s")
    return 0 if all(r.state == "killed" for r in ordered) else 1


if __name__ == "__main__":
    sys.exit(main())
