"""The README and the docs/ pages against the real CLI.

1. Parity: every `ablate <command> [<subcommand>]` and every flag the pages name (in command blocks and
   in inline code) exists in that command's --help. A flag named on its own (`--threads`) belongs to the
   command named last before it on the page.
2. The README's worked example, word for word: its command blocks run in order, in one shell, on a small
   generated Hugging Face folder at the path the README uses, with the TOML blocks written where the
   README says; the background run is killed and resumed, a cell reset, the experiment merged.
3. Every other command block (README and docs/) runs on the demo dataset, with small training settings
   added to `ablate run`, or is skipped with its reason in SKIPPED_BLOCKS / SKIPPED_LINES.
Also: every TOML block is a valid experiment config (or part of one), or datasets.toml entries; every
link between the pages resolves, anchors included.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import typer.main

from ablation_cli.cli import app
from ablation_cli.data.demo import DemoSource
from tests import warm
from tests.conftest import REPO, load_json, write_original_folder
from tests.lora_files import write_hf_dataset

README = REPO / "README.md"
# benchmarks.md and mutants.md document the scripts' own flags, not ablate's
PAGES = [README, *sorted(p for p in (REPO / "docs").glob("*.md") if p.name not in ("benchmarks.md", "mutants.md"))]
WORKED = "## Your own data: a worked example"
SHELL_LANGS = ("", "sh", "bash", "shell", "console")

FENCE = re.compile(r"^[ ]*```(\w*)[ ]*\n(.*?)^[ ]*```[ ]*$", re.M | re.S)
INLINE = re.compile(r"`([^`\n]+)`")
MENTION = re.compile(r"(?<![\w./-])ablate\s+(<command>|[a-z][\w-]*)(?:\s+([a-z][\w-]*))?")
FLAG = re.compile(r"(?<![\w./=<-])(--?[A-Za-z][\w-]*)")
COMMAND_LINE = re.compile(r"^(?:\w+=\S+\s+)*(?:nohup\s+)?(?:ablate|make)\s")


@functools.cache
def _root() -> Any:
    """The CLI's command tree (Typer's own click: a group is a command with ``commands``)."""
    root = typer.main.get_command(app)
    assert _is_group(root)
    return root


def _is_group(cmd: Any) -> bool:
    return hasattr(cmd, "commands")


def _options(cmd: Any) -> set[str]:
    return {o for p in cmd.params for o in (*p.opts, *p.secondary_opts) if o.startswith("-")} | {"--help"}


def _section(text: str, heading: str) -> str:
    start = text.index(heading)
    end = text.find("\n## ", start + len(heading))
    return text[start:end if end != -1 else None]


def _shell_lines(body: str) -> list[str]:
    """A shell block's command lines: continuations joined, comments and blank lines dropped."""
    lines = []
    for line in body.replace("\\\n", " ").splitlines():
        code = re.sub(r"(^|\s)#.*$", "", line).strip()
        if code:
            lines.append(code)
    return lines


# -- 1. parity ----------------------------------------------------------------------------------------

@dataclass
class Mention:
    page: str
    text: str
    command: str  # "run", "cache ls", or "*" for the generic `ablate <command>`
    flags: list[str]


def _segments(text: str) -> list[tuple[str, str]]:
    """The page in order: ("code", a shell command line) and ("inline", an inline code span)."""
    out: list[tuple[str, str]] = []
    pos = 0
    for m in FENCE.finditer(text):
        out += [("inline", s) for s in INLINE.findall(text[pos:m.start()])]
        if m.group(1) in SHELL_LANGS:
            out += [("code", line) for line in _shell_lines(m.group(2))]
        pos = m.end()
    out += [("inline", s) for s in INLINE.findall(text[pos:])]
    return out


def mentions(page: Path) -> tuple[list[Mention], list[str]]:
    """Every command named on the page with the flags that belong to it, and what could not be attributed."""
    root = _root()
    found: list[Mention] = []
    problems: list[str] = []
    current: str | None = None
    name = str(page.relative_to(REPO)) if page.is_relative_to(REPO) else page.name
    for kind, seg in _segments(page.read_text()):
        hits = list(MENTION.finditer(seg))
        if not hits:
            if kind == "inline" and seg.startswith("-") and (flags := FLAG.findall(seg)):
                if current is None:
                    problems.append(f"{name}: `{seg}` names a flag before any `ablate <command>`")
                else:
                    found.append(Mention(name, seg, current, flags))
            continue
        for i, hit in enumerate(hits):
            command, sub = hit.group(1), hit.group(2)
            if command != "<command>":
                cmd = root.commands.get(command)
                if _is_group(cmd):
                    command = f"{command} {sub}"
            rest = seg[hit.end():hits[i + 1].start() if i + 1 < len(hits) else None]
            current = "*" if command == "<command>" else command
            found.append(Mention(name, seg, current, FLAG.findall(rest)))
    return found, problems


def _lookup(command: str) -> Any:
    node = _root()
    for part in command.split():
        node = node.commands.get(part) if _is_group(node) else None
    return node


def test_the_pages_name_commands_and_flags_that_exist():
    every_option = set().union(*(_options(c) for c in _walk(_root())))
    missing: list[str] = []
    for page in PAGES:
        found, problems = mentions(page)
        missing += problems
        for m in found:
            if m.command == "*":
                missing += [f"{m.page}: {f} (in `{m.text}`) is no command's flag" for f in m.flags
                            if f not in every_option]
                continue
            cmd = _lookup(m.command)
            if cmd is None or _is_group(cmd):
                missing.append(f"{m.page}: `ablate {m.command}` is no command (in `{m.text}`)")
                continue
            missing += [f"{m.page}: ablate {m.command} has no {f} (in `{m.text}`)" for f in m.flags
                        if f not in _options(cmd)]
    assert not missing, "\n".join(dict.fromkeys(missing))


def _walk(group: Any) -> list[Any]:
    out: list[Any] = []
    for cmd in group.commands.values():
        out += _walk(cmd) if _is_group(cmd) else [cmd]
    return out


def test_the_parity_check_sees_commands_and_flags_in_blocks_inline_and_on_their_own(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("Run `ablate run --threads 2`, then `--no-such-flag`.\n\n```\nablate status --json  # --x\n"
                    "kill -9 123\nablate cache ls --json\nablate restorex --all\n```\n`ablate <command> --help`\n")
    found, problems = mentions(page)
    assert not problems
    assert [(m.command, m.flags) for m in found] == [
        ("run", ["--threads"]), ("run", ["--no-such-flag"]), ("status", ["--json"]), ("cache ls", ["--json"]),
        ("restorex", ["--all"]), ("*", ["--help"])]
    assert _lookup("cache ls") is not None and _lookup("restorex") is None


def test_every_toml_block_is_a_valid_config_or_datasets_toml(tmp_path):
    """Experiment TOML (whole or a table of it) loads and validates; datasets.toml entries resolve."""
    from ablation_cli.config import load_config
    from ablation_cli.data.sources import resolve

    checked = 0
    for page in PAGES:
        for lang, body in FENCE.findall(page.read_text()):
            if lang != "toml":
                continue
            data = tomllib.loads(body)
            if data and all(isinstance(v, dict) and "kind" in v for v in data.values()):
                for name in data:
                    assert resolve(name, data, base=tmp_path, cache_dir=tmp_path).name == name, (page, name)
            elif data.get("plugins"):
                continue  # needs its plugin file: tests/test_plugins.py runs that block with it
            else:
                (tmp_path / "exp.toml").write_text(body)
                load_config(tmp_path / "exp.toml")
            checked += 1
    assert checked >= 6


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_link_between_the_pages_resolves():
    broken = []
    for page in [README, *sorted((REPO / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)\s]+)\)", FENCE.sub("", page.read_text())):
            if re.match(r"\w+://", target):
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            if not linked.exists():
                broken.append(f"{page.name}: {target} (no such file)")
            elif anchor and linked.suffix == ".md":
                headings = re.findall(r"^#+\s+(.*)$", FENCE.sub("", linked.read_text()), re.M)
                if anchor not in {_slug(h) for h in headings}:
                    broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


# -- shared: a shell with `ablate` on its PATH ----------------------------------------------------------

def _shell_env(tmp: Path) -> dict[str, str]:
    """`ablate` as the README runs it: a command on PATH, this checkout's package."""
    bin_dir = tmp / ".bin"
    bin_dir.mkdir(exist_ok=True)
    shim = bin_dir / "ablate"
    # a real process per command, forked from a warm one that has imported torch (tests/warm.py)
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{REPO / "tests/warm.py"}" --client "$@"\n')
    shim.chmod(0o755)
    pythonpath = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": pythonpath,
            "PYTHONUNBUFFERED": "1", "ABLATE_WARM_SOCKET": warm.socket_path()}


def _project(root: Path) -> Path:
    """A folder like the repository's for the commands: its configs/."""
    shutil.copytree(REPO / "configs", root / "configs")
    return root


# -- 2. the worked example, word for word ---------------------------------------------------------------

@dataclass
class Step:
    line: str
    rc: int
    out: str
    err: str


def _worked_blocks() -> list[tuple[str, str, str]]:
    """The worked example's fenced blocks in order: (lang, body, the prose just before it)."""
    section = _section(README.read_text(), WORKED)
    blocks, pos = [], 0
    for m in FENCE.finditer(section):
        blocks.append((m.group(1), m.group(2), section[pos:m.start()]))
        pos = m.end()
    return blocks


def _target(prose: str) -> str:
    """The file a TOML block goes to: the last `configs/....toml` the prose before it names."""
    names = re.findall(r"`(configs/[\w.-]+\.toml)`", prose)
    assert names, f"no configs/*.toml named before a TOML block of the worked example: {prose[-200:]!r}"
    return names[-1]


def _cells(exp: Path) -> set[str]:
    return {p.stem for p in (exp / "checkpoints").glob("*.json")}


def test_the_worked_example_runs_word_for_word(tmp_path):
    root = _project(tmp_path / "repo")
    blocks = _worked_blocks()
    lines: list[str] = []
    experiment_toml: dict | None = None
    for lang, body, prose in blocks:
        if lang == "toml":
            target = root / _target(prose)
            if target.exists():  # an entry added to configs/datasets.toml
                target.write_text(target.read_text() + "\n" + body)
            else:
                target.write_text(body)
            if "name" in tomllib.loads(body):
                experiment_toml = tomllib.loads(body)
        else:
            assert lang in SHELL_LANGS, lang
            lines += _shell_lines(body)
    assert experiment_toml is not None
    registry = tomllib.loads((root / "configs/datasets.toml").read_text())
    entry = registry[experiment_toml["dataset"]]
    assert entry["kind"] == "hf"
    # the data at the path the README uses: a small save_to_disk folder (60 LoRAs, 3 classes)
    write_hf_dataset(DemoSource(name="mine", num_samples=60, num_classes=3, seed=3).load(), root / entry["path"])
    exp_rel = f"results/{experiment_toml['name']}_{experiment_toml['dataset']}"
    exp = root / exp_rel
    reps, layer_configs = experiment_toml["representations"], list(experiment_toml["layer_configs"])
    all_cells = {f"{lc}_{rep}" for lc in layer_configs for rep in reps}

    # One bash runs every line in order, so that `$!` is the background run. Harness lines (not the
    # README's) record each line's exit code and output, and wait where a person would.
    script = ["set -u"]
    kinds: list[str] = []
    for k, line in enumerate(lines):
        kind = ("inspect" if line.startswith("ablate inspect") else "background" if line.endswith("&")
                else "watch" if "status --watch" in line else "kill" if line.startswith("kill")
                else "reset" if line.startswith("ablate reset") else "merge" if line.startswith("ablate merge")
                else "run" if line.startswith("ablate run") else "other")
        kinds.append(kind)
        if kind == "watch":
            # `status --watch` refreshes until Ctrl-C: start watching once the run has written its
            # experiment.json, and give it the Ctrl-C (SIGINT) after 2 s
            script.append(f"for i in $(seq 1200); do [ -e {exp_rel}/experiment.json ] && break; sleep 0.05; done")
            line = f"timeout -s INT 2 {line}"
        if kind == "kill":
            # kill once the first cell is finished (and, checked below, before the last)
            script.append(f"for i in $(seq 2400); do ls {exp_rel}/checkpoints/*.json >/dev/null 2>&1 && break; "
                          "sleep 0.05; done")
        script.append(f"{{ {line}\n}} > .out_{k} 2> .err_{k}; echo $? > .rc_{k}")
        if kind == "kill":
            # the next command comes once the killed run has exited, as when a person types it
            script.append(f"wait $! 2>/dev/null; echo $? > .bg_rc; ls {exp_rel}/checkpoints > .cells_at_kill; "
                          f"(cd {exp_rel}/checkpoints && find runs -name 'run_*.json' | sort) > .runs_at_kill")
    assert kinds.count("background") == 1 and kinds.count("kill") == 1 and "inspect" in kinds, lines
    assert "reset" in kinds and "merge" in kinds and kinds.count("run") >= 3, lines
    done = subprocess.run(["bash", "-c", "\n".join(script)], cwd=root, env=_shell_env(tmp_path),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    steps = [Step(line, int((root / f".rc_{k}").read_text()), (root / f".out_{k}").read_text(),
                  (root / f".err_{k}").read_text()) for k, line in enumerate(lines)]

    def at(kind: str) -> int:
        return kinds.index(kind)

    inspect = steps[at("inspect")]
    assert inspect.rc == 0 and re.search(r"^LoRAs\s+60$", inspect.out, re.M), inspect
    assert re.search(r"^problems\s+none$", inspect.out, re.M), inspect.out
    assert steps[at("background")].rc == 0
    watch = steps[at("watch")]
    assert watch.rc == 124 and f"{experiment_toml['name']} on {experiment_toml['dataset']}" in watch.out, watch

    kill = at("kill")
    assert steps[kill].rc == 0, steps[kill]
    assert (root / ".bg_rc").read_text().strip() == "143", (root / "run.out").read_text()  # SIGTERM: saved, stopped
    at_kill = {n.removesuffix(".json") for n in (root / ".cells_at_kill").read_text().split() if n.endswith(".json")}
    assert at_kill and at_kill < all_cells, f"the kill came after the grid finished ({at_kill}): grow the example"
    runs_at_kill = (root / ".runs_at_kill").read_text().split()

    # the first run after the kill: every finished cell skipped, only the missing runs trained
    runs = [k for k in range(kill + 1, len(steps)) if kinds[k] == "run"]
    resumed = steps[runs[0]]
    assert resumed.rc == 0, resumed.err
    assert set(re.findall(r"Skipping (\S+) \(already completed\)", resumed.err)) == at_kill, resumed.err
    trained = {m[0]: m[1:] for m in re.findall(r"Evaluating (\S+): .*?runs (\d+)(?:-(\d+))? of (\d+) to train",
                                               resumed.err)}
    assert set(trained) == all_cells - at_kill, resumed.err
    num_runs = experiment_toml["num_runs"]
    for cell, (first, last, total) in trained.items():
        missing = [k for k in range(1, num_runs + 1) if f"runs/{cell}/run_{k}.json" not in runs_at_kill]
        assert (int(first), int(last or first), int(total)) == (missing[0], missing[-1], num_runs), (cell, missing)
    # the same experiment again (the same command, or --resume): nothing left to train
    again = steps[runs[1]]
    assert again.rc == 0 and "Evaluating" not in again.err, again.err
    assert set(re.findall(r"Skipping (\S+) \(already completed\)", again.err)) == all_cells, again.err
    assert any(f"--resume {exp_rel}" in steps[k].line for k in runs), "the example resumes with --resume DIR"

    # reset one cell: the next run trains exactly it; then merge
    reset = steps[at("reset")]
    assert reset.rc == 0 and "Deleted" in reset.out, reset
    words = reset.line.split()
    cell = f"{words[words.index('--layer-config') + 1]}_{words[words.index('--rep') + 1]}"
    rerun = steps[next(k for k in runs if k > at("reset"))]
    assert rerun.rc == 0 and re.findall(r"Evaluating (\S+):", rerun.err) == [cell], rerun.err
    merge = steps[at("merge")]
    assert merge.rc == 0 and "Merged" in merge.out, merge
    results = load_json(exp / "results.json")
    assert {c["cell"] for lc in layer_configs for c in results[f"{lc}_results"]} == all_cells
    assert results["num_runs"] == num_runs and not results["missing"]
    assert (exp / "results.md").is_file() and list((exp / "plots").glob("*.png"))
    assert _cells(exp) == all_cells and all(s.rc == 0 for s in steps if s.line.startswith("ablate run"))


# -- 3. every other command block, on the demo -----------------------------------------------------------

# a block, by its first command line -> why it does not run here (its flags are still checked above)
SKIPPED_BLOCKS = {
    "make demo": "installs a venv, trains the full demo grid and runs the whole suite: what CI (.ci/run) does",
    "make install": "the make targets install a venv and run the whole suite: what CI (.ci/run) does",
    "ablate run --dataset 50k --executor slurm": "needs a Slurm cluster: tests/test_scaleout.py runs one",
    "ablate run --dataset demo --num-runs 3 --mlflow": "MLflow on a new store costs about 30 s on 2 cores; "
                                                       "tests/test_tracking.py covers it",
    "ablate audit invariance --dataset demo": "four feature passes over the 800 demo LoRAs; tests/test_invariance.py "
                                              "audits an experiment on the tiny demo",
    "ablate run -c configs/single_module_probe.toml": "65 layer configs x 2 runs; tests/test_invariance.py runs "
                                                      "the same sweep on the tiny demo",
}
# single lines of a block that otherwise runs
SKIPPED_LINES = {
    "ablate run --dataset 50k --split-method original": "downloads the 50k Hugging Face dataset",
}
# small training settings added to `ablate run` lines (the block's own flags come after them and win)
SMALL = "--reps stats,spectral --layer-configs visual_only --max-epochs 2 --patience 1"
# what a block leaves behind (globs), by its first command line
EXPECTED = {
    "ablate features --dataset demo": ["feats/index.json", "feats/stats.npy", "feats/spectral.npy"],
    "ablate import results_50k/visual_ablation_50k": ["imported/visual_ablation_50k/results.json",
                                                       "comparison/comparison.md"],
    "ablate inspect data/my_loras": ["results/visual_ablation_my_loras-*/results.json"],
}


def command_blocks() -> list[tuple[str, list[str]]]:
    """(where, command lines) of every shell block with an `ablate` or `make` line, the worked example's
    excepted."""
    out = []
    for page in PAGES:
        text = page.read_text()
        if page == README:
            text = text.replace(_section(text, WORKED), "")
        for m in FENCE.finditer(text):
            lines = _shell_lines(m.group(2))
            if m.group(1) in SHELL_LANGS and any(COMMAND_LINE.match(line) for line in lines):
                out.append((f"{page.relative_to(REPO)}: {lines[0]}", lines))
    return out


def _skip_reason(first: str) -> str | None:
    return next((why for key, why in SKIPPED_BLOCKS.items() if first.startswith(key)), None)


def test_every_command_block_runs_or_is_skipped_for_a_stated_reason():
    blocks = command_blocks()
    assert len(blocks) >= 6, blocks
    keys = [key for key in [*SKIPPED_BLOCKS, *EXPECTED] if not any(lines[0].startswith(key) for _, lines in blocks)]
    keys += [key for key in SKIPPED_LINES if not any(line.startswith(key) for _, ls in blocks for line in ls)]
    assert not keys, f"no longer in the pages (drop them here): {keys}"


@pytest.fixture(scope="session")
def demo_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The repository's configs, a small demo experiment (SMALL, 1 run), the worked example's data folder,
    and an output folder of the original script (docs/original.md). Made once for the whole session: the
    xdist workers share it (its folder is under their common base), the first to need it makes it."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # xdist: this session's folder
    root, ready = shared / "readme-demo" / "repo", shared / "readme-demo" / "ready"
    with FileLock(str(shared / "readme-demo.lock")):
        if not ready.exists():
            shutil.rmtree(root.parent, ignore_errors=True)
            _make_demo_project(root)
            ready.touch()
    return root


def _make_demo_project(root: Path) -> None:
    root.parent.mkdir(parents=True)
    _project(root)
    write_hf_dataset(DemoSource(name="mine", num_samples=60, num_classes=3, seed=3).load(), root / "data/my_loras")
    write_original_folder(root / "results_50k/visual_ablation_50k", dataset="50k")
    done = subprocess.run(f"ablate run {SMALL} --dataset demo --num-runs 1", shell=True, cwd=root,
                          env=_shell_env(root.parent), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("where", [where for where, _ in command_blocks()],
                         ids=[" ".join(where.split()[:4]) for where, _ in command_blocks()])
def test_a_command_block_runs_on_the_demo(where, demo_project, tmp_path):
    lines = dict(command_blocks())[where]
    if why := _skip_reason(lines[0]):
        pytest.skip(why)
    work = tmp_path / "repo"
    shutil.copytree(demo_project, work, ignore=shutil.ignore_patterns(".feature_cache"))
    (work / ".feature_cache").symlink_to(demo_project / ".feature_cache")  # the demo's files and features
    env = _shell_env(tmp_path)
    for line in lines:
        if any(line.startswith(key) for key in SKIPPED_LINES):
            continue
        command = re.sub(r"^ablate run(?= )", f"ablate run {SMALL}", line) if "--resume" not in line else line
        done = subprocess.run(["bash", "-c", command], cwd=work, env=env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, f"{command}\n{done.stdout}\n{done.stderr}"
    for key, paths in EXPECTED.items():
        if lines[0].startswith(key):
            assert all(list(work.glob(p)) for p in paths), [p for p in paths if not list(work.glob(p))]


def test_the_architecture_page_names_every_module_and_the_code_cites_only_shipped_files():
    page = (REPO / "docs/architecture.md").read_text()
    package = REPO / "ablation_cli"
    modules = [p for p in package.rglob("*.py") if p.stem not in ("__init__", "__main__")]
    missing = [str(p.relative_to(package)) for p in modules if not re.search(rf"\b{p.stem}\b", page)]
    assert not missing, f"docs/architecture.md does not name: {missing}"
    cited = {m for p in modules for m in re.findall(r"\b([A-Z]+\.md)\b", p.read_text())}
    assert not cited - {"README.md"}, f"the code cites files that do not ship: {cited}"
    docs = {m for p in modules for m in re.findall(r"docs/([\w-]+\.md)", p.read_text())}
    assert all((REPO / "docs" / d).exists() for d in docs), docs
