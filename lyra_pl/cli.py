"""The `lyra-pl` command. Subcommands are added by the parts of the library that own them."""
from __future__ import annotations

import importlib
import sys


# Leading words -> (module, function, whether the function gets those words too). Modules
# are imported only when their subcommand runs: `lyra-pl info` must not pay for Lightning.
COMMANDS: dict[tuple[str, ...], tuple[str, str, bool]] = {
    ("bench",): ("lyra_pl.bench.__main__", "main", False),
    ("info",): ("lyra_pl.model.info", "main", False),
    ("plan",): ("lyra_pl.training.plan", "main", False),
    **{(verb,): ("lyra_pl.training.cli", "main", True)
       for verb in ("fit", "validate", "predict", "test")},
    ("eval",): ("lyra_pl.eval.cli", "main", False),
    ("needle",): ("lyra_pl.eval.needle", "main", False),
    ("chat",): ("lyra_pl.chat", "main", False),
    ("export",): ("lyra_pl.export", "main", False),
    ("pipeline",): ("lyra_pl.training.cli", "pipeline", False),
    ("data", "convert"): ("lyra_pl.data.convert", "main", False),
    ("data", "merge"): ("lyra_pl.data.convert", "merge_main", False),
    ("data", "example"): ("lyra_pl.data.example", "main", False),
    ("corpus",): ("lyra_pl.data.corpus.build", "main", False),
}


def close_process_group() -> None:
    """Destroy the default process group a command leaves behind (Lightning's strategies keep
    it after fit). Left to interpreter exit, gloo's worker threads can still hold tensors and
    the process aborts with SIGABRT ("terminate called without an active exception") after a
    run that succeeded. Only after success: destroying it while another rank is still inside
    a collective would hang."""
    dist = sys.modules.get("torch.distributed")  # `lyra-pl info` never imports torch
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["--version"], ["-V"]):
        from lyra_pl import __version__

        print(f"lyra-pl {__version__}")
        return 0
    for words, (module, function, keep) in COMMANDS.items():
        if tuple(argv[:len(words)]) == words:
            run = getattr(importlib.import_module(module), function)
            status = run(argv if keep else argv[len(words):])
            close_process_group()
            return status
    if argv and argv[0] not in ("-h", "--help"):
        known = sorted(" ".join(words) for words in COMMANDS)
        wrong = " ".join(argv[:2]) if argv[0] == "data" else argv[0]
        print(f"lyra-pl: unknown command {wrong!r} (commands: {', '.join(known)}; "
              "lyra-pl --help)", file=sys.stderr)
        return 2
    print(
        "usage: lyra-pl {fit,validate,predict,pipeline,eval,needle,chat,export,data,corpus,bench,"
        "info,plan} [options]\n\n"
        "subcommands:\n"
        "  fit|validate|predict  a stage (`lyra-pl fit --config configs/tiny/stage2_joint_sft.yaml`)\n"
        "  pipeline the four stages in order (`lyra-pl pipeline --preset tiny`)\n"
        "  eval     `lyra-pl eval --task all --ckpt runs/tiny/stage4_speech_gen/export`\n"
        "  needle   long-speech needle in a haystack (`lyra-pl needle --ckpt ...`)\n"
        "  chat     talk to an export: `lyra-pl chat --export runs/tiny/stage2_joint_sft/export`\n"
        "           (--image/--audio/--video F, --prompt TEXT, --jsonl FILE; see --help)\n"
        "  export   `lyra-pl export --ckpt runs/tiny/stage2_joint_sft --out hf --merge speech`:\n"
        "           a Qwen2-VL folder transformers loads (--format hf), or a stage export\n"
        "           from a checkpoint (--format lyra)\n"
        "  data     `lyra-pl data convert INPUT.json --out DIR`: official JSON -> shards;\n"
        "           `lyra-pl data merge DIR`: join the parts of a --part I/N conversion\n"
        "           `lyra-pl data example --out DIR`: a small offline release (docs/data.md)\n"
        "  corpus   `lyra-pl corpus build --out data/tiny`: build the tiny corpus (espeak-ng)\n"
        "  bench    benchmarks (see `lyra-pl bench --help`)\n"
        "  info     parameter counts of a preset (`lyra-pl info --preset base [--json]`)\n"
        "  plan     per-GPU memory estimate (`lyra-pl plan --preset pro --nodes 4 [--json]`)",
        file=sys.stderr if argv[:1] not in (["-h"], ["--help"]) else sys.stdout,
    )
    return 0 if argv[:1] in (["-h"], ["--help"]) else 2


if __name__ == "__main__":
    sys.exit(main())
