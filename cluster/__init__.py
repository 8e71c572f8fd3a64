"""privtune.cluster: Slurm — the ``cluster:`` config section, sbatch rendering, Slurm's commands, job status.

- ``config.py``: ``ClusterConfig`` (the run config's ``cluster:`` section: Slurm defaults, node setup lines);
- ``render.py``: sbatch scripts from plain values (one task per node, c10d rendezvous, preemption, records);
- ``slurm.py``: thin wrappers over ``sbatch``, ``scontrol``, ``scancel``;
- ``status.py``: ``privtune status`` — a run's (or sweep's) state from Slurm and its run dir's records;
- ``local.py``: a throwaway local Slurm cluster (tests, and trying privtune's Slurm commands on one machine).

What a job is made of (submission, arrays, sharded eval) is decided in ``launch/submit.py``, above this package.
"""
