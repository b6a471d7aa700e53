"""Parameter counts of a preset by component, built on the meta device (seconds, no memory).

``lyra-pl info --preset NAME [--json]``.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

import torch

from lyra_pl.model import lora
from lyra_pl.model.config import PRESETS, LyraConfig

if TYPE_CHECKING:
    from lyra_pl.model.lyra import LyraModel


def parameter_counts(config: LyraConfig) -> dict[str, int]:
    """Parameters per component and ``total``; a tensor shared by two components (tied
    embeddings) is counted once, in the first."""
    from lyra_pl.model.lyra import LyraModel

    with torch.device("meta"):
        model = LyraModel(config)
    counts = {row: t + f for row, (t, f) in parameter_rows(model).items()}
    counts["total"] = sum(counts.values())
    return counts


def _adapter_of(name: str, adapters: list[str]) -> str | None:
    """The adapter a parameter belongs to (peft names it ``...<lora_X>.<adapter>.weight``)."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part.startswith("lora_") and parts[i + 1] in adapters:
            return parts[i + 1]
    return None


def parameter_rows(model: LyraModel) -> dict[str, tuple[int, int]]:
    """``{row: (trainable, frozen)}`` per component (:meth:`LyraModel.components`, LoRA weights
    excluded) and per LoRA adapter (``lora:<name>``)."""
    adapters = lora.adapter_names(model.llm)
    rows: dict[str, list[int]] = {}
    seen: set[int] = set()  # tied weights count once, under the first component
    for component, module in model.components().items():
        rows.setdefault(component, [0, 0])  # a row even when all is shared (tied lm_head: 0)
        for name, p in module.named_parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            adapter = _adapter_of(name, adapters) if component == "llm" else None
            row = rows.setdefault(f"lora:{adapter}" if adapter else component, [0, 0])
            row[0 if p.requires_grad else 1] += p.numel()
    return {row: (t, f) for row, (t, f) in rows.items()}


def _human(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3f}{unit}"
    return str(int(n))


def table(preset: str, counts: dict[str, int]) -> str:
    rows = [(k, counts[k]) for k in counts if k != "total"] + [("total", counts["total"])]
    width = max(len(k) for k, _ in rows)
    lines = [f"Lyra preset {preset!r} (bf16 weights {counts['total'] * 2 / 2**30:.2f} GiB)",
             f"{'component':<{width}}  {'parameters':>15}  {'':>9}  {'bf16':>10}"]
    for k, n in rows:
        lines.append(f"{k:<{width}}  {n:>15,}  {_human(n):>9}  {n * 2 / 2**30:>8.3f} GiB")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lyra-pl info", description=__doc__.splitlines()[0])
    parser.add_argument("--preset", required=True, choices=sorted(PRESETS))
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    counts = parameter_counts(LyraConfig.from_preset(args.preset))
    if args.json:
        print(json.dumps({"preset": args.preset, **counts, "bf16_bytes": counts["total"] * 2}))
    else:
        print(table(args.preset, counts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
