"""`python -m sd_core.train` and `torchrun ... -m sd_core.train`: the trainer's command line.

The trainer itself is `sd_core.training.trainer`; this module is only the program torchrun starts.
"""

from sd_core.training.trainer import main

if __name__ == "__main__":
    try:
        from torch.distributed.elastic.multiprocessing.errors import record
    except ImportError:  # pragma: no cover
        raise SystemExit(main())
    raise SystemExit(record(main)())
