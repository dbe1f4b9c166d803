"""SLURM launch: `python -m launch.slurm submit CONFIG ...` submits `train.sbatch` (one torchrun per node,
SIGUSR2 before the time limit for save-and-requeue)."""
