"""Representations from outside ablate: a real pip-installed package (entry points), a file named in the
config, the checks on first use, and docs/plugins.md's plugin section copied verbatim."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ablation_cli import features, plugin_loader
from ablation_cli.config import load_config
from ablation_cli.errors import PluginError
from ablation_cli.features import plugins, registry
from tests.conftest import TINY_DEMO, ablate, load_json, write_project

REPO = Path(__file__).resolve().parent.parent
PACKAGE = Path(__file__).resolve().parent / "plugin_pkg"
PLUGIN_CELLS = ["all_layers_dw_gram", "all_layers_row_l1", "visual_only_dw_gram", "visual_only_row_l1"]


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/plugin_pkg installed by pip (a wheel built from its pyproject) into a folder of its own, which
    the CLI subprocesses get on PYTHONPATH: entry points found as in any environment, the venv untouched."""
    root = tmp_path_factory.mktemp("plugin")
    source = shutil.copytree(PACKAGE, root / "src")  # the build's own files stay out of the repository
    site = root / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "--target", str(site), str(source)], check=True, capture_output=True, text=True, timeout=300)
    assert (site / "ablate_test_plugins" / "reps.py").is_file()
    assert list(site.glob("ablate_test_plugins-0.1.0.dist-info/entry_points.txt"))
    return site


def _env(site: Path) -> dict[str, str]:
    return {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}


def test_an_installed_plugin_package_through_a_grid_with_a_kill_a_resume_a_cache_hit_and_an_edit(tmp_path, plugin_site):
    env = _env(plugin_site)
    listed = ablate("reps", cwd=tmp_path, env=env)
    assert listed.returncode == 0, listed.stderr
    assert re.search(r"^row_l1 +v1 +varies per matrix", listed.stdout, re.M), listed.stdout
    assert re.search(r"^dw_gram +v1 +2 per module", listed.stdout, re.M)
    assert "plugin from entry point weight_space = ablate_test_plugins.reps (ablate-test-plugins 0.1.0)" \
        in listed.stdout
    assert "row_l1" not in ablate("reps", cwd=tmp_path).stdout  # not installed: not there

    write_project(tmp_path, top='name = "tiny"\ndataset = "tinydemo"\nnum_runs = 2\ndevice = "cpu"\n'
                                'representations = ["stats", "row_l1", "dw_gram"]\n')
    killed = ablate("run", "-c", "exp.toml", cwd=tmp_path, env={**env, "ABLATE_CRASH_AT": "write:run_*.json@5"})
    assert killed.returncode == -9, killed.stderr
    done = ablate("run", "-c", "exp.toml", cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    exp = tmp_path / "results/tiny_tinydemo"
    results = load_json(exp / "results.json")
    assert sorted(c["cell"] for lc in ("all_layers", "visual_only") for c in results[f"{lc}_results"]) == \
        sorted([*PLUGIN_CELLS, "all_layers_stats", "visual_only_stats"])
    row = load_json(exp / "checkpoints/all_layers_row_l1.json")
    module = load_json(exp / "checkpoints/visual_only_dw_gram.json")
    # row_l1: out + 1 columns per matrix; dw_gram: 2 per module (visual_only: 64 factors, 32 modules)
    assert row["feature_dim"] == sum(shape[0] + 1 for shape in _tiny_shapes(tmp_path).values())
    assert module["num_layers"] == 64 and module["feature_dim"] == 2 * 32
    sha = row["meta"]["code"]["representation_source_sha"]
    assert len(sha) == 16 and "representation_source_sha" not in load_json(
        exp / "checkpoints/all_layers_stats.json")["meta"]["code"]
    assert sorted(p.name for p in (tmp_path / ".feature_cache/features").glob("*/dw_gram-v1-*.npy")) == \
        [f"dw_gram-v1-{_installed_sha(plugin_site)[:12]}.npy"]

    # exported for the researcher's own analysis, named by the plugins' feature names
    export = ablate("features", "-c", "exp.toml", "--reps", "row_l1,dw_gram", "--layer-config", "visual_only",
                    "--out", "feats", cwd=tmp_path, env=env)
    assert export.returncode == 0, export.stderr
    columns = load_json(tmp_path / "feats/index.json")["columns"]
    assert columns["dw_gram"][:2] == [f"{columns['dw_gram'][0].rsplit('/', 1)[0]}/fro",
                                      f"{columns['dw_gram'][0].rsplit('/', 1)[0]}/up_over_down"]
    assert len(columns["dw_gram"]) == 64 and columns["row_l1"][0].endswith("/row0_l1")
    assert np.load(tmp_path / "feats/row_l1.npy").shape == (120, len(columns["row_l1"]))

    # another experiment on the same data: the plugins' features come from the cache
    again = ablate("run", "-c", "exp.toml", "-o", "other", cwd=tmp_path, env=env)
    assert again.returncode == 0, again.stderr
    assert "Features stats, row_l1, dw_gram: from the cache" in again.stderr, again.stderr
    assert "LoRAs in one pass" not in again.stderr

    # edit the installed plugin: exactly its cells are stale, and its features are computed afresh
    reps = plugin_site / "ablate_test_plugins/reps.py"
    original = reps.read_text()
    try:
        reps.write_text(original + "\n# tuned\n")
        refused = ablate("run", "-c", "exp.toml", cwd=tmp_path, env=env)
        edited = ablate("run", "-c", "exp.toml", "--restart-stale", cwd=tmp_path, env=env)
    finally:
        reps.write_text(original)
    assert refused.returncode == 2 and re.search(  # only the code changed: recorded settings would not help
        r"representation_source_sha: [0-9a-f]{16} -> [0-9a-f]{16}  \(\d cell\(s\)\)\n  \(only code changed",
        refused.stderr), refused.stderr
    assert edited.returncode == 0, edited.stderr
    stale = sorted(re.findall(r"checkpoints/(\w+)\.json was made under another configuration "
                              r"\(representation_source_sha: [0-9a-f]{16} -> [0-9a-f]{16}\)", edited.stderr))
    assert stale == PLUGIN_CELLS, edited.stderr
    assert re.search(r"Features (row_l1, dw_gram|dw_gram, row_l1): 120 LoRAs in one pass", edited.stderr)
    assert "Skipping all_layers_stats (already completed)" in edited.stderr


def _tiny_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    index = next((folder / ".feature_cache/features").glob("*/index.json"))
    return {k: tuple(v) for k, v in load_json(index)["shapes"].items()}


def _installed_sha(site: Path) -> str:
    """The installed plugin's identity: its package's .py files (reps.py, classifiers.py, __init__.py)."""
    return plugins.source_digest(site / "ablate_test_plugins/reps.py")


# -- checks on first use: exit 2, one line naming the plugin, nothing written -------------------------

BAD = {
    "wrong shape": ('@representation("bad", features=["a"])\ndef bad(x):\n    return x.reshape(len(x), -1)[:, 0]\n',
                    r"representation bad \(.*reps\.py\) returned shape \(120,\) for 120 matrices of shape "
                    r"\(\d+, \d+\); expected \(120, 1\)"),
    "fewer names": ('@representation("bad", features=["a", "b"])\ndef bad(x):\n'
                    '    return x.reshape(len(x), -1)[:, :3]\n',
                    r"representation bad \(.*reps\.py\) returned 3 columns for shape \(\d+, \d+\) but declares 2 "
                    r"feature names \(declare one feature name per column\)"),
    "non-finite": ('@representation("bad", features=["a"])\ndef bad(x):\n    return np.log(0 * x[:, :1, 0])\n',
                   r"representation bad \(.*reps\.py\) returned non-finite values for 120 of 120 matrices"),
    "raises": ('@representation("bad", features=["a"])\ndef bad(x):\n    return helper(x)\n',
               r"representation bad \(.*reps\.py\) failed on 120 matrices of shape \(\d+, \d+\): NameError: name "
               r"'helper' is not defined at reps\.py:5"),
    "shadows": ('@representation("stats", features=["a"])\ndef bad(x):\n    return x[:, :1, 0]\n',
                r"plugin .*reps\.py: representation 'stats' shadows the built-in one"),
    "two of one name": ('@representation("bad", features=["a"])\ndef bad(x):\n    return x[:, :1, 0]\n\n\n'
                        '@representation("bad", features=["a"])\ndef other(x):\n    return x[:, :1, 0]\n',
                        r"two plugins define representation 'bad': .*reps\.py \(bad\) and .*reps\.py \(other\)"),
    "import error": ("import numpy_nowhere\n",
                     r"plugin reps\.py failed to import: ModuleNotFoundError: No module named 'numpy_nowhere' at "
                     r"reps\.py:3"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_plugin_is_exit_2_with_one_line_naming_it_and_nothing_written(tmp_path, case, tiny_cache):
    body, expected = BAD[case]
    (tmp_path / "reps.py").write_text("import numpy as np\nfrom ablation_cli.api import representation\n" + body)
    write_project(tmp_path, top='name = "tiny"\ndataset = "tinydemo"\nnum_runs = 1\ndevice = "cpu"\n'
                                'plugins = ["reps.py"]\nrepresentations = ["stats", "bad"]\n')
    result = ablate("run", "-c", "exp.toml", "--cache-dir", str(tiny_cache), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and re.search(expected, errors[0]), result.stderr
    assert "Traceback" not in result.stderr
    exp = tmp_path / "results/tiny_tinydemo"
    assert not (exp / "experiment.json").exists() and not (exp / "checkpoints").exists()
    # (its lock file, empty, stays, as every entry's does)
    assert not [p for p in tiny_cache.glob("features/*/*") if p.suffix in (".npy", ".json", ".tmp") and "bad" in p.name]
    if case == "raises":  # the plugin's own traceback is in run.log, from its frame on
        log = (exp / "run.log").read_text()
        assert 'in bad\n    return helper(x)' in log and "plugins.py" not in log.split("Traceback")[1]


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache folder for the bad-plugin cases: the tiny demo's files are generated once."""
    return tmp_path_factory.mktemp("tiny_cache")


def test_a_plugin_file_is_found_beside_the_config_loads_once_and_its_output_is_checked(tmp_path):
    (tmp_path / "sub").mkdir()
    plugin = tmp_path / "sub" / "my_reps.py"
    plugin.write_text("import numpy as np\nfrom ablation_cli.api import representation\n\n\n"
                      '@representation("zz_col_means", version=3, features=lambda s: [f"c{j}" for j in range(s[1])])\n'
                      "def zz_col_means(x):\n    return x.mean(axis=1)\n\n\n"
                      '@representation("zz_two", features=["only"])\n'
                      "def zz_two(x):\n    return x[:, 0, :2]\n")
    config = tmp_path / "sub" / "exp.toml"
    config.write_text('plugins = ["my_reps.py"]\nrepresentations = ["zz_col_means", "stats"]\n')
    try:
        cfg, _ = load_config(config)
        assert cfg.plugins == [str(plugin.resolve())]  # absolute: a worker or a Slurm task finds it
        assert load_config(config)[0] == cfg  # loaded once: no "two plugins" for the same file
        rep = features.get("zz_col_means")
        assert rep.plugin and rep.unit == "matrix" and rep.dim((4, 6)) == 6 and rep.version == 3
        assert rep.feature_names((4, 6)) == ["c0", "c1", "c2", "c3", "c4", "c5"]
        assert rep.cache_version == f"3-{rep.source_sha[:12]}" and not rep.default
        x = np.arange(2 * 4 * 6, dtype=np.float32).reshape(2, 4, 6)
        out = rep.compute(x)
        assert out.dtype == np.float32 and np.array_equal(out, x.mean(axis=1))
        with pytest.raises(PluginError, match=r"zz_two \(.*my_reps\.py\) returned 2 columns for shape \(4, 6\) "
                                              r"but declares 1 feature names"):
            features.get("zz_two").compute(x)
    finally:
        _forget("zz_col_means", "zz_two")


def _forget(*names: str) -> None:
    """Take this process's in-test plugins out of the registry again (other tests list it)."""
    for name in names:
        registry._REGISTRY.pop(name, None)
        plugins._identities.pop(name, None)
    plugin_loader._loaded.clear()


# -- docs/plugins.md's section, verbatim --------------------------------------------------------------

def _section_blocks(heading: str, page: str = "docs/plugins.md") -> dict[str, str]:
    text = (REPO / page).read_text()
    start = text.index(heading)
    end = text.find("\n## ", start + len(heading))
    section = text[start:end if end != -1 else None]
    blocks: dict[str, str] = {}
    for lang, body in re.findall(r"```(\w+)\n(.*?)```", section, re.S):
        blocks.setdefault(lang, body)
    return blocks


def _toml(data: dict[str, Any]) -> str:
    """A small TOML writer for merged configs (scalars, lists, tables of them)."""
    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return repr(v)

    def table(prefix: str, d: dict[str, Any]) -> list[str]:
        lines = [f"{k} = {value(v)}" for k, v in d.items() if not isinstance(v, dict)]
        for k, v in d.items():
            if isinstance(v, dict):
                name = f"{prefix}.{k}" if prefix else k
                lines += ["", f"[{name}]", *table(name, v)]
        return lines

    return "\n".join(table("", data)) + "\n"


def test_the_docs_plugin_section_runs_as_written(tmp_path):
    blocks = _section_blocks("## Your own representation in 20 lines")
    python, toml = blocks["python"], blocks["toml"]
    assert len(python.strip().splitlines()) <= 24
    added = tomllib.loads(toml)
    (plugin,) = added["plugins"]
    (tmp_path / "configs" / plugin).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / "configs" / plugin).write_text(python)  # beside the config, as docs/plugins.md says
    config = tomllib.loads((REPO / "configs/visual_ablation.toml").read_text())
    config.update(added)
    config["dataset"] = "tinydemo"
    (tmp_path / "configs/visual_ablation.toml").write_text(_toml(config))
    (tmp_path / "configs/datasets.toml").write_text(
        "[tinydemo]\nkind = \"demo\"\n" + "".join(f"{k} = {v}\n" for k, v in TINY_DEMO.items()))
    listed = ablate("reps", cwd=tmp_path)  # the default config, as the docs' commands use it
    assert listed.returncode == 0, listed.stderr
    new = [r for r in added["representations"] if not registry.is_built_in(r)]
    assert new and all(re.search(rf"^{r} ", listed.stdout, re.M) for r in new), listed.stdout
    run = ablate("run", "--num-runs", "1", "--max-epochs", "3", "--layer-configs", "visual_only", "--workers", "2",
                 cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    exp = tmp_path / "results" / f"{config['name']}_tinydemo"
    for rep in added["representations"]:
        doc = load_json(exp / f"checkpoints/visual_only_{rep}.json")
        assert doc["num_runs"] == 1 and doc["feature_dim"] > 0
    md = (exp / "results.md").read_text()
    assert all(rep in md for rep in new)


def test_a_plugin_that_stops_importing_leaves_its_traceback_in_the_run_log_of_the_experiment(tmp_path):
    plugin = tmp_path / "reps.py"
    plugin.write_text("import numpy as np\nfrom ablation_cli.api import representation\n\n\n"
                      '@representation("firsts", features=["first"])\ndef firsts(x):\n    return x[:, 0, :1]\n')
    write_project(tmp_path, top='name = "tiny"\ndataset = "tinydemo"\nnum_runs = 1\ndevice = "cpu"\n'
                                'plugins = ["reps.py"]\nrepresentations = ["firsts"]\n')
    first = ablate("run", "-c", "exp.toml", "--layer-configs", "visual_only", "--max-epochs", "2", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    plugin.write_text(plugin.read_text().replace("import numpy as np", "import numpy as np\nfrom . import helpers"))
    broken = ablate("run", "-c", "exp.toml", cwd=tmp_path)
    assert broken.returncode == 2 and "error: plugin reps.py failed to import: ImportError" in broken.stderr
    log = (tmp_path / "results/tiny_tinydemo/run.log").read_text()
    assert "plugin reps.py failed to import" in log and 'reps.py", line 2, in <module>' in log


# -- identity: the plugin's package, not only its defining file -----------------------------------------

def _package(root: Path, name: str) -> Path:
    """A package on ``root``: ``reps.py`` declares a representation whose numbers come from ``helper.py``."""
    pkg = root / name
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "helper.py").write_text("def scale(x):\n    return 2.0 * x\n")
    (pkg / "sub" / "reps.py").write_text(
        f"from ablation_cli.api import representation\nfrom {name}.helper import scale\n\n\n"
        '@representation("zz_scaled_mean", features=["m"])\n'
        "def zz_scaled_mean(x):\n    return scale(x.mean(axis=(1, 2)))[:, None]\n")
    return pkg


def _loaded_fingerprint(spec: str, base: Path | None = None) -> tuple[str, int | str]:
    """Load the plugin afresh (as a new process would) and fingerprint an all_layers cell of it."""
    from ablation_cli.data.demo import DemoSource
    from ablation_cli.grid import cell_fingerprint
    from tests.conftest import tiny_config

    _forget("zz_scaled_mean")
    for module in [m for m in sys.modules if m.startswith(("zz_fp_pkg", "ablate_plugin_"))]:
        del sys.modules[module]
    plugin_loader.load([spec], base)
    info = DemoSource(name="tinydemo", **TINY_DEMO).describe()
    fingerprint = cell_fingerprint(tiny_config(), info, "all_layers", "zz_scaled_mean", info.layers)
    return fingerprint.digest, registry.get("zz_scaled_mean").cache_version


@pytest.mark.parametrize("spec", ["zz_fp_pkg.sub.reps", "zz_fp_pkg/sub/reps.py"], ids=["module", "file"])
def test_editing_a_helper_module_of_the_plugins_package_makes_its_cells_stale(tmp_path, monkeypatch, spec):
    pkg = _package(tmp_path, "zz_fp_pkg")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        digest, cache_version = _loaded_fingerprint(spec, tmp_path)
        assert _loaded_fingerprint(spec, tmp_path) == (digest, cache_version)  # the same files: the same cells
        (pkg / "helper.py").write_text("def scale(x):\n    return 3.0 * x\n")
        edited, edited_version = _loaded_fingerprint(spec, tmp_path)
        assert edited != digest and edited_version != cache_version  # stale cells, a feature-cache miss
        assert registry.get("zz_scaled_mean").source_sha == plugins.source_digest(pkg / "sub" / "reps.py")
    finally:
        _forget("zz_scaled_mean")
        for module in [m for m in sys.modules if m.startswith(("zz_fp_pkg", "ablate_plugin_"))]:
            del sys.modules[module]


def test_a_plugin_file_in_no_package_is_identified_by_that_file_alone(tmp_path):
    """As before packages were hashed: the sha256 of the file (fingerprints of such plugins stay as they were)."""
    import hashlib

    (tmp_path / "helper.py").write_text("X = 1\n")  # beside it, but no package: not part of its identity
    lone = tmp_path / "reps.py"
    lone.write_text("import numpy as np\n")
    before = plugins.source_digest(lone)
    assert before == hashlib.sha256(lone.read_bytes()).hexdigest()
    (tmp_path / "helper.py").write_text("X = 2\n")
    assert plugins.source_digest(lone) == before and plugins.package_root(lone) is None
    pkg = _package(tmp_path, "zz_fp_pkg")
    assert plugins.package_root(pkg / "sub" / "reps.py") == pkg.resolve()
    (pkg / ".hidden").mkdir()
    inside = plugins.source_digest(pkg / "sub" / "reps.py")
    (pkg / ".hidden" / "x.py").write_text("X = 1\n")  # a hidden folder (a venv, say) is not the package's code
    assert plugins.source_digest(pkg / "helper.py") == inside
