"""`python -m lyra_pl.bench <subcommand>`; `lyra-pl bench` forwards its arguments to `main`."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from lyra_pl.bench import kernels

    via_cli = Path(sys.argv[0]).name == "lyra-pl"
    parser = argparse.ArgumentParser(prog="lyra-pl bench" if via_cli else "python -m lyra_pl.bench",
                                     description="Benchmarks of lyra_pl.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("kernels", help="soft-DTW and token-pruning ops vs references and peers",
                       description=kernels.__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    kernels.add_arguments(p)
    p.set_defaults(run=kernels.main)
    from lyra_pl.bench import prefill

    p = sub.add_parser("prefill", help="prefill / decode / memory with and without LMME "
                                       "(the paper's Table 4a)", description=prefill.__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    prefill.add_arguments(p)
    p.set_defaults(run=prefill.main)
    from lyra_pl.bench import train

    p = sub.add_parser("train", help="training throughput and MFU of a stage-2 step, baseline "
                                     "vs LMME", description=train.__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_arguments(p)
    p.set_defaults(run=train.main)
    from lyra_pl.bench import data

    p = sub.add_parser("data", help="the converter: a 2-hour MP3's time and peak RSS, small "
                                    "samples with 1 vs N workers", description=data.__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    data.add_arguments(p)
    p.set_defaults(run=data.main)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
