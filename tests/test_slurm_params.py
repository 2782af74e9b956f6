"""executors/slurm.py: the sbatch parameters are a pure function of the config, pinned by golden files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from ablation_cli.executors.slurm import sbatch_parameters
from tests.conftest import tiny_config

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("ABLATE_UPDATE_GOLDEN") == "1"

SLURM = {"partition": "gpu", "gpus_per_task": 1, "cpus_per_task": 8, "mem_gb": 32, "time_min": 120,
         "array_parallelism": 16, "features_cpus": 16, "features_mem_gb": 64.5,
         "setup": ["module load cuda/12.1", "source ~/venvs/ablate/bin/activate"],
         "extra": {"account": "mylab", "qos": "high"}}

CASES = {
    "features": ("features", None, SLURM),
    "cells_after_features": ("cells", "4242", SLURM),
    "cells_cache_ready": ("cells", None, SLURM),
    "cells_defaults": ("cells", None, {}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_sbatch_parameters_golden(case):
    job, after, slurm = CASES[case]
    params = sbatch_parameters(tiny_config(executor={"slurm": slurm}), job, after=after)
    path = GOLDEN / f"sbatch_{case}.json"
    text = json.dumps(params, indent=1, sort_keys=True) + "\n"
    if UPDATE:
        path.write_text(text)
    assert text == path.read_text()


def test_the_array_waits_for_the_feature_job_and_is_dropped_if_it_fails():
    params = sbatch_parameters(tiny_config(), "cells", after="77")
    assert params["dependency"] == "afterok:77"
    assert params["additional_parameters"] == {"kill-on-invalid-dep": "yes"}
    assert "dependency" not in sbatch_parameters(tiny_config(), "cells")


def test_unknown_job_kind_is_refused():
    with pytest.raises(ValueError, match="'features' or 'cells'"):
        sbatch_parameters(tiny_config(), "other")


@pytest.mark.parametrize("case", list(CASES))
def test_submitit_accepts_every_parameter(case, tmp_path):
    submitit = pytest.importorskip("submitit")
    job, after, slurm = CASES[case]
    executor = submitit.SlurmExecutor(folder=tmp_path)
    executor.update_parameters(**sbatch_parameters(tiny_config(executor={"slurm": slurm}), job, after=after))
    script = submitit.slurm.slurm._make_sbatch_string(command="true", folder=tmp_path, **executor.parameters)
    if job == "cells" and slurm:
        assert "#SBATCH --account=mylab" in script and "#SBATCH --partition=gpu" in script
        assert ("#SBATCH --dependency=afterok:4242" in script) == (after is not None)


@pytest.mark.parametrize(("time_min", "warned_s"), [(1, 15), (4, 60), (8, 120), (240, 120)])
def test_the_time_limit_warning_leaves_a_short_task_time_to_work(time_min, warned_s):
    params = sbatch_parameters(tiny_config(executor={"slurm": {"time_min": time_min}}), "cells")
    assert params["signal_delay_s"] == warned_s
