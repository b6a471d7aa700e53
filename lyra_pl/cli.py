"""The `lyra-pl` command. Subcommands are added by the parts of the library that own them."""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:
        from lyra_pl.bench.__main__ import main as bench_main

        return bench_main(argv[1:])
    if argv[:1] == ["info"]:
        from lyra_pl.model.info import main as info_main

        return info_main(argv[1:])
    if argv[:1] == ["plan"]:
        from lyra_pl.training.plan import main as plan_main

        return plan_main(argv[1:])
    print(
        "usage: lyra-pl {bench,info,plan} [options]\n\n"
        "subcommands:\n  bench    benchmarks (see `lyra-pl bench --help`)\n"
        "  info     parameter counts of a preset (`lyra-pl info --preset base [--json]`)\n"
        "  plan     per-GPU memory estimate (`lyra-pl plan --preset pro --nodes 4 [--json]`)",
        file=sys.stderr if argv[:1] not in (["-h"], ["--help"]) else sys.stdout,
    )
    return 0 if argv[:1] in (["-h"], ["--help"]) else 2


if __name__ == "__main__":
    sys.exit(main())
