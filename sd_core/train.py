"""`python -m sd_core.train` and `torchrun ... -m sd_core.train`: the trainer's command line.

    python -m sd_core.train --profile tiny --data-root data --max-steps 200          # one process
    torchrun --nproc_per_node=2 -m sd_core.train --profile tiny --data-root data     # DDP (gloo on CPU)
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-endpoint=HOST:29500 -m sd_core.train --profile sd15 ...
    sd train --help

The trainer itself is `sd_core.training.trainer`, its flags `sd_core.training.args`; this module is only the
program torchrun starts (torch's ``record`` writes a failing rank's error where torchrun reports it).
"""

from sd_core.training.trainer import main

if __name__ == "__main__":
    try:
        from torch.distributed.elastic.multiprocessing.errors import record
    except ImportError:  # pragma: no cover
        raise SystemExit(main())
    raise SystemExit(record(main)())
