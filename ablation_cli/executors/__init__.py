"""Executors run the cells the orchestrator planned, and return an :class:`~.base.Outcome`.

    base.py         Outcome, Batch and the Executor protocol
    cell.py         one cell in this process: train its missing runs, checkpoint each, then the cell
    local.py        the cell loop (claims, failure records) and LocalExecutor: cells one by one here
    workers.py      WorkersExecutor: the cell loop in N processes on this machine
    child.py        the bootstrap of a child process (a worker or a Slurm task) from a JobSpec
    spec.py         JobSpec: what a child needs, in picklable form
    slurm.py        SlurmExecutor (submitit): a feature job plus a job array, sbatch parameters
    slurm_task.py   what runs inside a Slurm job
    slurm_queue.py  squeue / sacct reads and the status overlay (no submitit: status uses it)

This package's ``__init__`` imports nothing, so ``ablate status`` can read the Slurm queue cheaply.
"""
