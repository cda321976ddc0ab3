"""The `sd` command: one entry point that dispatches to each stage's own argparse `main`.

Subcommands are imported lazily so `sd --help` stays fast and a missing optional piece only affects its
own subcommand.
"""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module, function, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str, str]] = {
    "train": ("sd_core.train", "main", "train the UNet on the latent cache (torchrun-compatible)"),
    "generate": ("sd_core.sampling.generate", "generate_main", "generate images from a checkpoint"),
    "export-diffusers": ("sd_core.sampling.export", "main", "export a checkpoint as a diffusers pipeline folder"),
    "components": ("sd_core.encoding.components_cli", "main",
                   "prepare frozen components offline: the real CLIP tokenizer, sd15-shaped random weights, "
                   "the shipped tiny VAE fit"),
}


def _usage() -> str:
    width = max(map(len, SUBCOMMANDS))
    lines = ["usage: sd <command> [options]", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {help_}" for name, (_, _, help_) in SUBCOMMANDS.items()]
    lines += ["", "Run `sd <command> --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"sd: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, func_name, _ = SUBCOMMANDS[name]
    func = getattr(importlib.import_module(module_name), func_name)
    return int(func(rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
