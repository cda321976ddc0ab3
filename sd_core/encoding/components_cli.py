"""``sd components``: prepare frozen components offline (no model hub; only the package index).

    sd components clip-tokenizer --out DIR [--cache DIR] [--max-length 77]
    sd components sd15-random --out DIR [--cache DIR] [--seed 0]
    sd components tiny-vae [--out DIR] [--overrides JSON]

``clip-tokenizer`` writes the real CLIP BPE tokenizer (`sd_core.encoding.components.build_clip_tokenizer`);
``sd15-random`` writes SD 1.x-shaped VAE and text encoder with random weights plus that tokenizer
(`build_sd15_random_components`), what configs/sd15-smoke.yaml points at. Both load with
``from_pretrained(DIR)``. A failure (no package index, a folder that holds something else) is one line on
stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sd_core.config import json_object_arg


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sd components", description="Prepare frozen components offline (no model hub; only the package index).")
    sub = parser.add_subparsers(dest="what", required=True, metavar="{clip-tokenizer,sd15-random,tiny-vae}")
    cache_help = ("where the open_clip_torch wheel is cached (default: $SD_CACHE_DIR, else "
                  "$XDG_CACHE_HOME/sd-pipeline, else ~/.cache/sd-pipeline)")
    tok = sub.add_parser("clip-tokenizer", help="the real CLIP ViT-L/14 BPE tokenizer (SD 1.x's token ids)")
    tok.add_argument("--out", type=Path, required=True,
                     help="folder to write (loads with AutoTokenizer.from_pretrained)")
    tok.add_argument("--cache", type=Path, default=None, help=cache_help)
    tok.add_argument("--max-length", type=int, default=77, help="model_max_length (default 77, SD 1.x)")
    rnd = sub.add_parser("sd15-random", help="sd-vae-ft-mse- and CLIP-ViT-L/14-shaped components, random weights")
    rnd.add_argument("--out", type=Path, required=True, help="folder to write: OUT/{vae,text_encoder,tokenizer}")
    rnd.add_argument("--cache", type=Path, default=None, help=cache_help)
    rnd.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    vae = sub.add_parser("tiny-vae", help="fit the tiny profile's VAE here and write it as the shipped fit")
    vae.add_argument("--out", type=Path, default=None,
                     help="folder to write (default: sd_core/encoding/tiny_vae, the fit the package ships)")
    vae.add_argument("--overrides", type=json_object_arg, default=None,
                     help='profile overrides as JSON, e.g. \'{"components": {"vae_fit_steps": 400}}\'')
    return parser


def _tiny_vae(args: argparse.Namespace) -> None:
    from sd_core.config import get_profile
    from sd_core.encoding.components import fit_tiny_vae_for_shipping
    from sd_core.encoding.shipped_vae import SHIPPED_DIR, write_shipped_fit

    vae, record = fit_tiny_vae_for_shipping(get_profile("tiny", overrides=args.overrides))
    out = write_shipped_fit(vae, record, args.out or SHIPPED_DIR)
    print(f"tiny VAE fit ({record.fit['steps']} steps, PSNR {record.reconstruction['psnr']:.2f} dB) written to {out}")


def main(argv: list[str] | None = None) -> int:
    from sd_core.encoding.clip_bpe import ClipBpeError
    from sd_core.encoding.components import build_clip_tokenizer, build_sd15_random_components

    args = _parser().parse_args(argv)
    try:
        if args.what == "tiny-vae":
            _tiny_vae(args)
        elif args.what == "clip-tokenizer":
            if args.max_length < 2:
                raise ValueError(f"--max-length must be at least 2 (BOS and EOS), got {args.max_length}")
            tok = build_clip_tokenizer(args.out, cache_dir=args.cache, max_length=args.max_length)
            print(f"CLIP tokenizer ({len(tok)} tokens, max length {tok.model_max_length}) written to {args.out}")
        else:
            rec = build_sd15_random_components(args.out, seed=args.seed, cache_dir=args.cache)
            n = rec["params"]
            print(f"sd15 components with random weights (seed {rec['seed']}: VAE {n['vae']:,}, text encoder "
                  f"{n['text_encoder']:,} params) in {args.out}/{{vae,text_encoder,tokenizer}}")
    except (ClipBpeError, ValueError, OSError) as e:  # ValueError: also a bad --overrides (ConfigError)
        print(f"sd components {args.what}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
