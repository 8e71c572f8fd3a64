"""privtune.cluster: Slurm rendering, submission, arrays and requeue (not built yet; see the cluster issue).

Distributed runs today launch with ``torchrun --nproc_per_node N -m privtune run CONFIG`` (gloo on CPU, NCCL on
GPU); ``privtune plan|submit|status`` answer "not implemented yet" until this package lands.
"""
