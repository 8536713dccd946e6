"""`lab sweep --launcher slurm`: the sweep's workers as one SLURM job array, submitted through submitit.

settings.py: the launcher settings and the checks made before anything is submitted; array.py: the array on the
cluster (submit, task states, cancel) and what each task runs; follow.py: the parent in the foreground, or
--detach."""
