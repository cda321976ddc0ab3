"""The training stage: the torchrun trainer and everything it reads and writes.

- `trainer`: `train(settings)`, the loop in named steps (build data, build model, restore, step, validate, save,
  report); `python -m sd_core.train` is its command line.
- `args`: the command line's flags and the resolved `Settings` of a run (no torch import).
- `rng`: every RNG a rank draws from, seeded per rank, saved and restored for an exact resume.
- `faults`: test-only fault injection (``SD_TRAIN_FAULT``: a NaN loss or a crash at a given step).
- `data_order`: the held-out split and the deterministic, resumable micro-batch order.
- `lr_schedule`: linear warmup then cosine decay.
- `distributed`: process-group setup (torchrun's environment or a single process).
- `metrics_log`: metrics.jsonl, wandb and Dagster Pipes.
- `checkpoint`: the checkpoint directory, its typed `config.json` record, atomic saves and loading.
- `launch`: starting and supervising the trainer from another process (the Dagster asset).
"""
