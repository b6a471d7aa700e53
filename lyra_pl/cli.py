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
    if argv[:1] in (["fit"], ["validate"], ["predict"], ["test"]):
        from lyra_pl.training.cli import main as cli_main

        return cli_main(argv)
    if argv[:1] == ["eval"]:
        from lyra_pl.eval.cli import main as eval_main

        return eval_main(argv[1:])
    if argv[:1] == ["needle"]:
        from lyra_pl.eval.needle import main as needle_main

        return needle_main(argv[1:])
    if argv[:1] == ["pipeline"]:
        from lyra_pl.training.cli import pipeline

        return pipeline(argv[1:])
    if argv[:2] == ["data", "convert"]:
        from lyra_pl.data.convert import main as convert_main

        return convert_main(argv[2:])
    if argv[:1] == ["corpus"]:
        from lyra_pl.data.corpus.build import main as corpus_main

        return corpus_main(argv[1:])
    print(
        "usage: lyra-pl {fit,validate,predict,pipeline,eval,needle,data,corpus,bench,info,plan} "
        "[options]\n\n"
        "subcommands:\n"
        "  fit|validate|predict  a stage (`lyra-pl fit --config configs/tiny/stage2_joint_sft.yaml`)\n"
        "  pipeline the four stages in order (`lyra-pl pipeline --preset tiny`)\n"
        "  eval     `lyra-pl eval --task all --ckpt runs/tiny/stage4_speech_gen/export`\n"
        "  needle   long-speech needle in a haystack (`lyra-pl needle --ckpt ...`)\n"
        "  data     `lyra-pl data convert INPUT.json --out DIR`: official JSON -> shards\n"
        "  corpus   `lyra-pl corpus build --out data/tiny`: build the tiny corpus (espeak-ng)\n"
        "  bench    benchmarks (see `lyra-pl bench --help`)\n"
        "  info     parameter counts of a preset (`lyra-pl info --preset base [--json]`)\n"
        "  plan     per-GPU memory estimate (`lyra-pl plan --preset pro --nodes 4 [--json]`)",
        file=sys.stderr if argv[:1] not in (["-h"], ["--help"]) else sys.stdout,
    )
    return 0 if argv[:1] in (["-h"], ["--help"]) else 2


if __name__ == "__main__":
    sys.exit(main())
