"""The `ablate` command: exit codes, messages, the user's flow. In this process (Typer's CliRunner), except
where a real process is the point: a kill, a lock another process holds, what the interpreter does at exit."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import (
    ablate,
    ablate_in_process,
    ablate_popen,
    load_json,
    make_experiment,
    make_results,
    write_project,
)

EXP = Path("results/tiny_tinydemo")


def run_tiny(project: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return ablate_in_process("run", "--config", "exp.toml", *extra, cwd=project)


@pytest.mark.slow
def test_run_status_reset_rerun_merge(project: Path):
    first = run_tiny(project)
    assert first.returncode == 0, first.stderr
    assert "Total progress:      0/4 (0.0%)" in first.stderr
    assert "Run 2/2: Train=" in first.stderr
    exp = project / EXP
    assert (exp / "results.json").exists() and (exp / "results.md").exists()
    log = (exp / "run.log").read_text()
    assert "Run 1/2: Train=" in log and "Checkpoint saved: visual_only_stats" in log

    status = ablate_in_process("status", "--json", cwd=project)
    model = json.loads(status.stdout)
    assert model["done"] == 4 and model["total"] == 4 and model["eta_s"] == 0.0
    assert {c["state"] for c in model["cells"]} == {"done"}

    shown = ablate_in_process("reset", "--rep", "stats", "--layer-config", "visual_only", "--dry-run", cwd=project)
    assert shown.returncode == 0 and "visual_only_stats: 3 file(s)" in shown.stdout
    assert (exp / "checkpoints/visual_only_stats.json").exists()

    reset = ablate_in_process("reset", "--rep", "stats", "--layer-config", "visual_only", "--yes", cwd=project)
    assert reset.returncode == 0, reset.stderr
    assert not (exp / "checkpoints/visual_only_stats.json").exists()
    assert not (exp / "checkpoints/runs/visual_only_stats").exists()
    assert (exp / "checkpoints/all_layers_stats.json").exists()

    again = run_tiny(project)
    assert again.returncode == 0, again.stderr
    assert "Total progress:      3/4 (75.0%)" in again.stderr
    assert "Skipping all_layers_stats (already completed)" in again.stderr
    assert "Evaluating visual_only_stats" in again.stderr
    assert "Evaluating all_layers_stats" not in again.stderr

    merged = ablate_in_process("merge", cwd=project)
    assert merged.returncode == 0 and "Merged 4 cell(s)" in merged.stdout
    assert "results.json, results.md, results.csv, results.tex" in merged.stdout
    assert "Plots: 10 files in results/tiny_tinydemo/plots" in merged.stdout
    assert len((exp / "results.csv").read_text().splitlines()) == 5
    assert sorted(p.suffix for p in (exp / "plots").iterdir()) == [".pdf"] * 5 + [".png"] * 5
    results = load_json(exp / "results.json")
    assert [r["representation"] for r in results["all_layers_results"]] == ["simple_stats", "stats"]
    assert results["provenance"]["ablate_version"] == "0.1.0"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--dropout", "1.5"], "classifier.dropout = 1.5: Input should be less than 1"),
        (["--num-runs", "0"], "num_runs = 0: Input should be greater than or equal to 1"),
        (["--reps", "simple_stats,bogus"], "unknown representation 'bogus' (allowed: simple_stats, rank_based"),
        (["--layer-configs", "text_only"], "unknown layer config 'text_only' (allowed: all_layers, visual_only)"),
        (["--dataset", "nope"], "unknown dataset 'nope'; known datasets: tinydemo"),
        (["--device", "tpu"], "device = 'tpu': allowed: auto, cpu, cuda, cuda:N"),
    ],
    ids=["dropout", "num-runs", "rep", "layer-config", "dataset", "device"],
)
def test_bad_input_is_one_line_and_exit_2(project: Path, args: list[str], message: str):
    result = run_tiny(project, *args)
    assert result.returncode == 2
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr


def test_bad_config_file(tmp_path: Path):
    (tmp_path / "exp.toml").write_text("num_runs = [oops")
    result = ablate_in_process("run", "--config", "exp.toml", cwd=tmp_path)
    assert result.returncode == 2 and "exp.toml: not valid TOML" in result.stderr
    missing = ablate_in_process("run", "--config", "nope.toml", cwd=tmp_path)
    assert missing.returncode == 2 and "config file not found: nope.toml" in missing.stderr
    write_project(tmp_path, training="[training]\nmax_epochs = 8\npatince = 3\n")
    typo = ablate_in_process("run", "--config", "exp.toml", cwd=tmp_path)
    assert typo.returncode == 2 and "training.patince = 3: Extra inputs are not permitted" in typo.stderr


def test_commands_without_an_experiment_exit_2(tmp_path: Path):
    for cmd in (["status"], ["merge"], ["reset", "--all", "--yes"]):
        result = ablate_in_process(*cmd, cwd=tmp_path)
        assert result.returncode == 2, cmd
        assert "error: output folder results does not exist" in result.stderr


@pytest.mark.slow
def test_reset_checks_names_and_asks(project: Path):
    assert run_tiny(project, "--reps", "simple_stats").returncode == 0
    bad = ablate_in_process("reset", "--rep", "spectral", cwd=project)
    assert bad.returncode == 2
    assert "unknown representation 'spectral' (this experiment has: simple_stats)" in bad.stderr
    bad_lc = ablate_in_process("reset", "--rep", "simple_stats", "--layer-config", "../etc", cwd=project)
    assert bad_lc.returncode == 2 and "unknown layer config '../etc'" in bad_lc.stderr
    both = ablate_in_process("reset", "--rep", "simple_stats", "--all", cwd=project)
    assert both.returncode == 2
    assert "give --rep NAME, --classifier NAME and/or --where KEY=VALUE, or --all" in both.stderr
    unconfirmed = ablate_in_process("reset", "--all", cwd=project)  # stdin is no terminal
    assert unconfirmed.returncode == 2 and "pass --yes" in unconfirmed.stderr
    assert len(list((project / EXP / "checkpoints").glob("*.json"))) == 2


@pytest.mark.slow
def test_second_run_is_refused_with_exit_3(project: Path):
    assert run_tiny(project, "--reps", "simple_stats").returncode == 0
    exp = project / EXP
    code = ("import sys, time; from pathlib import Path; from ablation_cli.store import experiment_lock\n"
            "with experiment_lock(Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(60)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(exp)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        started = time.monotonic()
        result = ablate("run", "--config", "exp.toml", cwd=project)
        assert result.returncode == 3
        assert f"pid {holder.pid}" in result.stderr and "another ablate run holds" in result.stderr
        assert time.monotonic() - started < 20  # at once, not after waiting
        reset = ablate("reset", "--all", "--yes", cwd=project)
        assert reset.returncode == 3  # never deletes under a live run
        assert (exp / "checkpoints/all_layers_simple_stats.json").exists()
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.slow
def test_sigterm_keeps_finished_runs_and_exits_143(project: Path):
    write_project(project, training="[training]\nmax_epochs = 300\npatience = 300\nbatch_size = 32\n")
    proc = ablate_popen("run", "--config", "exp.toml", cwd=project, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                        text=True)
    run1 = project / EXP / "checkpoints/runs/all_layers_simple_stats/run_1.json"
    deadline = time.monotonic() + 480  # run 1 takes seconds, minutes on a loaded machine
    while not run1.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "stopped by SIGTERM; finished runs and cells are saved" in err
    assert load_json(run1)["run"] == 1
    status = json.loads(ablate_in_process("status", "--json", cwd=project).stdout)
    first = status["cells"][0]
    assert first["state"] == "interrupted" and first["runs_done"] >= 1


def test_status_plain_text_has_no_control_codes_and_imports_no_torch(project: Path, tmp_path: Path):
    from ablation_cli.config import ExperimentConfig  # noqa: F401  (just to be sure the package imports)

    exp = project / EXP
    exp.mkdir(parents=True)
    make_experiment(exp)
    result = ablate_in_process("status", cwd=project)
    assert result.returncode == 0
    assert "\x1b" not in result.stdout
    assert "representation" in result.stdout and "Total: 1/6 cells done" in result.stdout
    probe = (
        "import sys\nsys.argv = ['ablate', 'status', '--json']\nfrom ablation_cli.cli import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'datasets', 'submitit', 'sklearn', 'scipy', 'pydantic') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=project, capture_output=True, text=True)
    assert "HEAVY []" in out.stdout, out.stdout + out.stderr


def test_the_exit_skips_the_last_collection_but_not_atexit_nor_buffered_output(project: Path):
    """main() freezes what is alive before the interpreter's teardown (its last garbage collection walked
    every object of torch and scikit-learn: up to a second after the work), and nothing else changes:
    atexit handlers run, buffered output is flushed, the exit code stays."""
    probe = (
        "import atexit, gc, sys\n"
        "atexit.register(lambda: print('ATEXIT frozen', gc.get_freeze_count() > 0))\n"
        "sys.argv = ['ablate', 'status', '--output-dir', 'nowhere']\n"
        "from ablation_cli.cli import main\n"
        "out = open('late.txt', 'w')\n"
        "out.write('buffered')\n"
        "main()\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=project, capture_output=True, text=True)
    assert out.returncode == 2, out.stderr  # no experiment there: the documented exit code
    assert "ATEXIT frozen True" in out.stdout
    assert (project / "late.txt").read_text() == "buffered"  # an open file is still closed and flushed


def test_compare_needs_two_experiments_with_results(tmp_path: Path):
    one = ablate_in_process("compare", "results", cwd=tmp_path)
    assert one.returncode == 2 and "compare needs at least two experiments" in one.stderr
    (tmp_path / "a").mkdir()
    missing = ablate_in_process("compare", "a", "b", cwd=tmp_path)
    assert missing.returncode == 2 and "error: no experiment in a" in missing.stderr


def test_compare_two_real_result_files(tmp_path: Path):
    for name, n, scale in (("small", 1000, 1.0), ("large", 9170, 1.1)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(make_results(name, n, scale)))
    result = ablate_in_process("compare", "large/results.json", "small/results.json", "--out", "cmp", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "| layer config | representation | small (n=1000) | large (n=9170) |" in result.stdout
    assert sorted(p.name for p in (tmp_path / "cmp").iterdir()) == ["comparison.csv", "comparison.md",
                                                                    "comparison.pdf", "comparison.png"]


@pytest.mark.slow
def test_a_buggy_representation_fails_its_cells_only_exit_1(project: Path):
    """The researcher's scenario: a bug in one representation. The rest finishes; exit 1; rerun retries."""
    from ablation_cli.features import registry

    real = registry._REGISTRY["stats"]

    def broken(x):
        raise ValueError("bug in stats")

    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(registry._REGISTRY, "stats", real.__class__(**{**real.__dict__, "compute": broken}))
        failed = run_tiny(project)
    assert failed.returncode == 1, failed.stderr
    assert "Cell all_layers_stats FAILED: ValueError: bug in stats" in failed.stderr
    assert "2 cell(s) failed: all_layers_stats, visual_only_stats" in failed.stderr
    exp = project / EXP
    assert load_json(exp / "failures/visual_only_stats.json")["message"] == "bug in stats"
    status = json.loads(ablate_in_process("status", "--json", cwd=project).stdout)
    assert {c["id"]: c["state"] for c in status["cells"]} == {
        "all_layers_simple_stats": "done", "all_layers_stats": "failed",
        "visual_only_simple_stats": "done", "visual_only_stats": "failed"}
    fixed = run_tiny(project)
    assert fixed.returncode == 0, fixed.stderr
    assert "Skipping all_layers_simple_stats (already completed)" in fixed.stderr
    assert not (exp / "failures/all_layers_stats.json").exists()


# -- every command maps the machine's refusals to one line and exit 4 ----------------------------------

REFUSED = ("Permission denied (EACCES) (this user may not write (or read) there: fix its permissions or use "
           "another folder, then rerun the same command: everything finished is kept)")


@pytest.mark.parametrize("command", [["cache", "ls"], ["cache", "prune"]], ids=["ls", "prune"])
def test_an_unreadable_cache_is_one_line_and_exit_4(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    command: list[str]):
    """Listing the cache meets a folder this user may not read (as root, chmod cannot deny it: the
    listing is told so)."""
    from ablation_cli.features.cache import FeatureCache

    def refused(cache: FeatureCache) -> list:
        raise PermissionError(errno.EACCES, "Permission denied", str(cache.root / "tinydemo"))

    monkeypatch.setattr(FeatureCache, "entries", refused)
    result = ablate_in_process(*command, "--cache-dir", "cache", cwd=tmp_path)
    assert (result.returncode, result.stdout) == (4, "")
    assert result.stderr.splitlines() == [f"error: {Path('cache/features/tinydemo')}: {REFUSED}"]


@contextlib.contextmanager
def refusing_changes(folder: Path):
    """``folder`` where nothing may be created or deleted: read-only for a user, immutable for root
    (whom chmod does not stop); skips the test where neither is possible."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            yield
        finally:
            folder.chmod(0o755)
        return
    try:
        immutable = subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0
    except FileNotFoundError:
        immutable = False
    if not immutable:
        pytest.skip("running as root on a filesystem without chattr +i: nothing refuses root")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


def test_a_cache_that_refuses_deletion_is_one_line_and_exit_4(tmp_path: Path):
    import numpy as np

    from ablation_cli.features.cache import FeatureCache

    cache = FeatureCache.under(tmp_path / "cache")
    cache.store("tinydemo", "stats", 1, np.zeros((3, 4), np.float32), {"dataset": "tinydemo"})
    with refusing_changes(cache.root / "tinydemo"):
        result = ablate_in_process("cache", "prune", "--all", "--cache-dir", "cache", cwd=tmp_path)
    assert result.returncode == 4, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {cache.root.resolve() / 'tinydemo'}/"), lines
    assert "(EACCES)" in lines[0] or "(EPERM)" in lines[0]
    assert [e.representation for e in cache.entries()] == ["stats"]  # nothing was deleted
