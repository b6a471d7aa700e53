"""The memory planner: arithmetic checked against hand computation from parameter_counts."""
import dataclasses
import json
import math

import pytest

from lyra_pl import cli
from lyra_pl.model.config import LyraConfig
from lyra_pl.model.info import parameter_counts
from lyra_pl.training import plan as P


@pytest.fixture(scope="module")
def base():
    return LyraConfig.from_preset("base")


@pytest.fixture(scope="module")
def counts(base):
    return parameter_counts(base)


def test_decoder_layer_formula_matches_counts(base, counts):
    # embeddings + L layers + final norm == the LLM's meta-device count
    llm = base.vocab_size * base.hidden_size + base.num_layers * P.decoder_layer_params(base) \
        + base.hidden_size
    assert llm == counts["llm"]


def test_parameter_part_by_hand(base, counts):
    p = P.estimate(base, stage=1, nodes=1, gpus_per_node=8, seq_len=2048, sharding="full")
    total = counts["total"]
    layer = P.decoder_layer_params(base)
    h, gh = base.generator_hidden, base.generator_heads
    gen_layer = P._qwen2_layer_params(h, gh, base.generator_kv_heads, base.generator_intermediate)
    # the frozen encoders are replicated, not units: the largest unit is a decoder layer
    largest = max(layer, gen_layer)
    encoders = counts["vision"] + counts["audio_encoder"]
    root = (total - base.num_layers * layer - encoders - base.generator_layers * gen_layer)
    assert p.shard_size == 8
    assert p.params_sharded == math.ceil(4 * (total - encoders) / 8)
    assert p.params_gathered == 2 * root + 2 * 2 * largest
    assert p.params_replicated == 2 * encoders
    assert p.params == p.params_sharded + p.params_gathered + p.params_replicated
    assert p.trainable_params == counts["speech_projector"] and p.lora == 0
    assert p.grads == math.ceil(4 * counts["speech_projector"] / 8)
    assert p.optimizer == math.ceil(8 * counts["speech_projector"] / 8)
    assert p.total == (p.params + p.lora + p.grads + p.optimizer + p.activations + p.logits)
    assert p.estimate is True


def test_lora_counts(base):
    p = P.estimate(base, stage=2, nodes=1, gpus_per_node=1, seq_len=128)
    h, i, kv = base.hidden_size, base.intermediate_size, base.num_kv_heads * base.head_dim
    per_layer = (2 * h) + 2 * (h + kv) + (2 * h) + 3 * (h + i)  # in + out of each target
    # stage 2 trains two r64 adapters (speech and sound) and both projectors
    assert p.lora_params == 2 * 64 * per_layer * base.num_layers
    counts = P._counts(base)
    assert p.trainable_params == (counts["speech_projector"] + counts["sound_projector"]
                                  + p.lora_params)
    p3 = P.estimate(base, stage=3, nodes=1, gpus_per_node=1, seq_len=128)
    assert p3.lora_params == 128 * per_layer * base.num_layers


def test_more_gpus_shard_proportionally(base):
    a = P.estimate(base, 2, nodes=1, gpus_per_node=8, seq_len=1024, sharding="full")
    b = P.estimate(base, 2, nodes=2, gpus_per_node=8, seq_len=1024, sharding="full")
    assert b.shard_size == 16
    assert b.params_sharded == pytest.approx(a.params_sharded / 2, abs=1)
    assert b.optimizer == pytest.approx(a.optimizer / 2, abs=1)
    assert b.grads == pytest.approx(a.grads / 2, abs=1)
    assert b.params_gathered == a.params_gathered and b.activations == a.activations


def test_hybrid_shards_within_a_node(base):
    hyb = P.estimate(base, 2, nodes=4, gpus_per_node=8, seq_len=1024, sharding="hybrid")
    one = P.estimate(base, 2, nodes=1, gpus_per_node=8, seq_len=1024, sharding="full")
    full = P.estimate(base, 2, nodes=4, gpus_per_node=8, seq_len=1024, sharding="full")
    assert hyb.shard_size == 8 and full.shard_size == 32
    assert (hyb.params, hyb.grads, hyb.optimizer, hyb.total) == \
        (one.params, one.grads, one.optimizer, one.total)
    assert full.params_sharded < hyb.params_sharded


def test_checkpointing_reduces_activations(base):
    for stage in (1, 2, 3, 4):
        p = P.estimate(base, stage, 1, 8, seq_len=4096)
        assert 0 < p.activations_checkpointed < p.activations
        assert p.total_checkpointed < p.total


def test_activation_formula(base):
    s = 1000
    p = P.estimate(base, 2, 1, 8, seq_len=s, micro_batch=2)
    h, i, a = base.hidden_size, base.intermediate_size, base.num_heads
    kv = base.num_kv_heads * base.head_dim
    per_tok = 12 * h + 4 * kv + 6 * i + 4 * a + 14 * 64
    assert p.activations == 2 * s * base.num_layers * per_tok
    assert p.activations_checkpointed == 2 * (2 * h * s * base.num_layers + per_tok * s)
    assert p.logits == 2 * s * base.vocab_size * 10


def test_lmme_reduces_activations(base):
    plain = P.estimate(base, 3, 1, 8, seq_len=32768)
    lm = P.estimate(base, 3, 1, 8, seq_len=32768, lmme=(4, 0.7))
    assert lm.activations < plain.activations
    assert lm.activations_checkpointed < plain.activations_checkpointed
    t = lm.tokens_per_layer
    assert t[0] == 32768 and t == sorted(t, reverse=True) and t[-1] < t[0]
    # 3 pruning points, 90% context: text + ctx * 0.7^3 (exact floor per step, integer arithmetic)
    ctx = round(0.9 * 32768)
    for _ in range(3):
        ctx = ctx * 7 // 10
    assert t[-1] == 32768 - round(0.9 * 32768) + ctx
    assert P.estimate(base, 3, 1, 8, seq_len=32768, lmme=(1, 0.5)).activations \
        == plain.activations  # one block: nothing to prune after


@pytest.mark.parametrize("seq_len", [100, 189, 200, 367])
def test_lmme_tokens_are_what_select_tokens_keeps(base, seq_len):
    # 90% context: 90, 170, 180, 330 tokens, where 0.7 * n in double falls just below the exact
    # count (0.7 * 90 = 62.99999999999999); each pruning point keeps floor(7n / 10), >= min_keep.
    t = P.lmme_tokens_per_layer(base, seq_len, (4, 0.7), context_fraction=0.9)
    ctx = round(0.9 * seq_len)
    text = seq_len - ctx
    expected = [text + ctx]
    for _ in range(3):
        ctx = ctx if ctx < base.lmme_min_keep else max(base.lmme_min_keep, ctx * 7 // 10)
        expected.append(text + ctx)
    assert list(dict.fromkeys(t)) == list(dict.fromkeys(expected))


def test_stage4_no_llm_activations_or_grads(base, counts):
    p = P.estimate(base, 4, 1, 8, seq_len=4096)
    assert p.lora == 0 and p.trainable_params == counts["speech_generator"]
    assert p.grads == math.ceil(4 * counts["speech_generator"] / 8)
    # no LLM activations: only the generator's layers over answer positions x upsample
    g_tok = 4096 * base.generator_upsample
    gh, gkv = base.generator_hidden, base.generator_kv_heads * base.generator_hidden // \
        base.generator_heads
    g_per_tok = (12 * gh + 4 * gkv + 6 * base.generator_intermediate
                 + 4 * base.generator_heads)
    assert p.activations == g_tok * g_per_tok * base.generator_layers
    assert p.logits == g_tok * (base.n_units + 1) * 10  # CTC logits, no LLM vocabulary logits
    half = P.estimate(base, 4, 1, 8, seq_len=4096, answer_fraction=0.5)
    assert half.activations == p.activations // 2


@pytest.mark.parametrize("kwargs", [
    dict(gpus_per_node=0), dict(nodes=0), dict(seq_len=0), dict(stage=5),
    dict(sharding="zero3"), dict(lmme=(0, 0.5)), dict(lmme=(4, 1.5)), dict(micro_batch=0),
])
def test_estimate_rejects_bad_inputs(base, kwargs):
    args = dict(config=base, stage=2, nodes=1, gpus_per_node=8, seq_len=128) | kwargs
    with pytest.raises(ValueError):
        P.estimate(**args)


def test_cli_table_and_json(capsys):
    assert cli.main(["plan", "--preset", "base", "--nodes", "2", "--seq-len", "1024"]) == 0
    out = capsys.readouterr().out
    for word in ("params", "grads", "optimizer", "activations", "ESTIMATE", "Assumptions"):
        assert word in out
    assert "GiB" in out
    assert P.main(["--preset", "base", "--stage", "3", "--lmme", "4,0.7", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    for key in ("params", "grads", "optimizer", "activations", "activations_checkpointed",
                "total", "total_checkpointed", "logits", "lora"):
        assert isinstance(d[key], int) and d[key] >= 0
    assert d["estimate"] is True and d["seq_len"] == P.STAGE_SEQ_LEN[3]
    assert d["lmme"] == [4, 0.7] and d["preset"] == "base" and d["stage"] == 3


@pytest.mark.parametrize("argv, msg", [
    (["--preset", "base", "--gpus-per-node", "0"], "--gpus-per-node must be >= 1"),
    (["--preset", "huge"], "invalid choice"),
    (["--preset", "base", "--lmme", "4"], "N,RHO"),
    (["--preset", "base", "--lmme", "4,0"], "0 < RHO"),
    (["--preset", "base", "--lmme", "99,0.5"], "n_blocks"),
    (["--preset", "base", "--seq-len", "-3"], "--seq-len"),
    (["--preset", "base", "--stage", "7"], "invalid choice"),
])
def test_cli_bad_arguments(capsys, argv, msg):
    with pytest.raises(SystemExit) as e:
        P.main(argv)
    assert e.value.code != 0
    assert msg in capsys.readouterr().err


def test_plan_from_a_stage_config_with_a_verdict(capsys):
    """--config takes preset, stage, nodes, GPUs, seq_len, micro-batch, sharding, LMME and
    activation checkpointing from the file; the same numbers as the flags spelled out."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    settings = P.settings_from_config(str(root / "configs/base/stage3_long_speech.yaml"))
    assert settings == {"preset": "base", "stage": 3, "nodes": 1, "gpus_per_node": 8,
                        "seq_len": 131072, "micro_batch": 1, "sharding": "full",
                        "lmme": (4, 0.7), "activation_checkpointing": True,
                        "context_parallel": 2}
    pro = P.settings_from_config(str(root / "configs/pro/stage2_joint_sft.yaml"))
    assert (pro["nodes"], pro["micro_batch"], pro["sharding"], pro["lmme"]) == \
        (4, 4, "hybrid", None)

    assert cli.main(["plan", "--config", "configs/pro/stage2_joint_sft.yaml", "--json"]) == 0
    from_config = json.loads(capsys.readouterr().out)
    assert cli.main(["plan", "--preset", "pro", "--stage", "2", "--nodes", "4",
                     "--gpus-per-node", "8", "--seq-len", "8192", "--micro-batch", "4",
                     "--sharding", "hybrid", "--json"]) == 0
    spelled = json.loads(capsys.readouterr().out)
    assert from_config["total_checkpointed"] == spelled["total_checkpointed"]
    gib = from_config["total_checkpointed"] / 2**30
    assert from_config["verdict"] == (
        f"{'fits' if gib <= 80 else 'does NOT fit'} in 80 GiB per GPU with activation "
        f"checkpointing, as the config sets (estimate {gib:,.1f} GiB)")
    # A flag overrides the file; --gpu-memory sets the bar.
    assert cli.main(["plan", "--config", "configs/pro/stage2_joint_sft.yaml", "--micro-batch",
                     "1", "--gpu-memory", "1000"]) == 0
    last = capsys.readouterr().out.rstrip().splitlines()[-1]
    assert last.startswith("Fits in 1000 GiB per GPU with activation checkpointing, as the "
                           "config sets (estimate ")
    p1 = P.estimate(LyraConfig.from_preset("pro"), 2, 4, 8, 8192, 1, "hybrid", None)
    assert P.verdict(p1, 1000, True).startswith("fits in 1000 GiB per GPU")
    assert "does NOT fit" in P.verdict(p1, 1, None) and "with it" in P.verdict(p1, 1, None)


# ---------------------------------------------------------------------- context parallelism
PRO3 = ["--preset", "pro", "--stage", "3", "--nodes", "4", "--gpus-per-node", "8", "--lmme",
        "4,0.7", "--context-fraction", "0.95", "--answer-fraction", "0.01"]


@pytest.fixture(scope="module")
def pro():
    return LyraConfig.from_preset("pro")


def _pro3(pro, cp=None):
    kw = {} if cp is None else {"context_parallel": cp}
    return P.estimate(pro, 3, 4, 8, 131072, 1, "hybrid", (4, 0.7), context_fraction=0.95,
                      answer_fraction=0.01, **kw)


def test_cp1_is_the_plan_without_cp(pro, capsys):
    """CP 1 changes nothing: the bytes printed before context parallelism was modelled (Pro
    stage 3, 131,072 tokens, LMME(4, 0.7): 188.22 GiB with per-layer AC) and the same text."""
    p = _pro3(pro, cp=1)
    assert dataclasses.asdict(p) == dataclasses.asdict(_pro3(pro))
    assert (p.params, p.lora, p.grads, p.optimizer, p.logits) == \
        (47808929735, 842137600, 857084928, 1714169856, 1993559040)
    assert (p.activations, p.activations_checkpointed) == (1925741660160, 148884815872)
    assert (p.total, p.total_checkpointed) == (1978957541319, 202100697031)
    assert p.context_parallel == 1 and p.data_parallel == 32
    assert p.cp_transient == p.cp_transient_checkpointed == p.cp_kv_gather == 0
    assert P.main(PRO3) == 0
    without = capsys.readouterr().out
    assert P.main(PRO3 + ["--context-parallel", "1"]) == 0
    assert capsys.readouterr().out == without
    assert "CP" not in without
    assert "total                                  1,843.05        188.22" in without


def test_pro_stage3_131k_fits_80gib_with_cp8(pro, capsys):
    assert P.main(PRO3 + ["--context-parallel", "8"]) == 0
    out = capsys.readouterr().out
    lines = out.rstrip().splitlines()
    assert lines[0].endswith(", LMME(4, 0.7), CP 8 (data-parallel replicas 4)")
    assert any(line.startswith("CP all-gathers (largest)") for line in lines)
    assert lines[-1] == ("Does NOT fit in 80 GiB per GPU without activation checkpointing "
                         "(estimate 298.2 GiB); fits in 80 GiB per GPU with it (estimate "
                         "68.7 GiB)")
    p = _pro3(pro, cp=8)
    assert p.total_checkpointed < 80 * P.GIB
    assert f"(estimate {p.total_checkpointed / P.GIB:,.1f} GiB)" in lines[-1]
    one = _pro3(pro, cp=1)
    # parameters are sharded as without CP; activations and logits are per rank
    assert (p.params, p.lora, p.grads, p.optimizer) == \
        (one.params, one.lora, one.grads, one.optimizer)
    assert p.logits == one.logits // 1311 * 164  # 1,311 answer positions, 164 on a rank
    # per-layer AC: the LMME gather at the first pruning point is the largest CP transient
    assert p.cp_transient_checkpointed == p.cp_lmme_gather > p.cp_input_gather \
        > p.cp_kv_gather_checkpointed
    assert p.total_checkpointed == (p.params + p.lora + p.grads + p.optimizer + p.logits
                                    + p.activations_checkpointed + p.cp_transient_checkpointed)


def test_activations_scale_as_one_over_cp(base, pro):
    # 32,768 tokens, no LMME: every layer's tokens split evenly over 2, 4, 8 ranks, no padding
    plans = {r: P.estimate(base, 3, 1, 8, 32768, context_parallel=r) for r in (1, 2, 4, 8)}
    for r, p in plans.items():
        assert p.activations * r == plans[1].activations
        assert p.activations_checkpointed * r == plans[1].activations_checkpointed
        assert p.params == plans[1].params and p.optimizer == plans[1].optimizer
    # LMME: the pruned lengths are not multiples of 2R, so the split pads (at most 2R - 1
    # tokens a layer): 1/R within 0.1%
    lm = {r: _pro3(pro, cp=r) for r in (1, 2, 4, 8)}
    for r in (2, 4, 8):
        for a, b in ((lm[r].activations, lm[1].activations),
                     (lm[r].activations_checkpointed, lm[1].activations_checkpointed)):
            assert a * r >= b
            assert a * r / b == pytest.approx(1, rel=1e-3)
    assert lm[8].activations_checkpointed * 2 == pytest.approx(lm[4].activations_checkpointed,
                                                               rel=1e-3)


def test_cp_transients_by_hand():
    """4 layers, hidden 128, 4 heads of 32: K and V, bf16, over the padded sequence."""
    mha = LyraConfig(num_kv_heads=4)  # kv_dim 128
    # 101 tokens, CP 2: padded to a multiple of 4 -> 104, 52 per rank
    p = P.estimate(mha, 2, 1, 2, 101, micro_batch=2, context_parallel=2)
    assert p.tokens_per_layer == [101] * 4
    kv_one_layer = 2 * 2 * (2 * 128 * 104)  # micro-batch 2 x K and V x 2 B x 128 x 104
    assert kv_one_layer == 106_496
    assert p.cp_kv_gather_checkpointed == 106_496
    assert p.cp_kv_gather == 4 * 106_496  # no AC: kept for backward in each of the 4 layers
    assert p.cp_input_gather == 2 * 2 * 128 * 101  # 2 samples x 2 B x h x seq_len = 51,712
    assert p.cp_lmme_gather == 0
    assert (p.cp_transient, p.cp_transient_checkpointed) == (425_984, 106_496)
    full = P.estimate(mha, 2, 1, 2, 101, micro_batch=2)
    assert p.total - full.total == (p.activations - full.activations) \
        + (p.logits - full.logits) + 425_984
    # GQA kv_dim 64, LMME(2, 0.5) prunes after layer 1: 90 context tokens of 100 -> 45.
    # The LMME gather, 2 B x 128 x (100 gathered + 55 kept) = 39,680, beats one layer's K/V
    # (2 x 2 B x 64 x 100 = 25,600) and the input (2 B x 128 x 100 = 25,600).
    g = P.estimate(LyraConfig(), 3, 1, 2, 100, lmme=(2, 0.5), context_parallel=2)
    assert g.tokens_per_layer == [100, 100, 55, 55]
    assert g.cp_lmme_gather == 39_680
    assert g.cp_kv_gather_checkpointed == 25_600 and g.cp_input_gather == 25_600
    assert g.cp_transient_checkpointed == 39_680
    assert g.cp_kv_gather == 2 * 2 * 64 * (100 + 100 + 56 + 56)  # 55 padded to 56
    table = P.format_plan(g)
    row = next(line for line in table.splitlines() if line.startswith("CP all-gathers"))
    assert row.split()[-2:] == [f"{g.cp_transient / P.GIB:,.2f}", "0.00"]


@pytest.mark.parametrize("kwargs, msg", [
    (dict(context_parallel=0), "context_parallel must be an int >= 1"),
    (dict(context_parallel=True), "context_parallel must be an int >= 1"),
    (dict(context_parallel=3), "context_parallel 3 must divide gpus_per_node 8"),
    (dict(context_parallel=16, nodes=2), "context_parallel 16 must divide gpus_per_node 8"),
])
def test_estimate_rejects_bad_context_parallel(base, kwargs, msg):
    args = dict(config=base, stage=3, nodes=1, gpus_per_node=8, seq_len=128) | kwargs
    with pytest.raises(ValueError, match=msg):
        P.estimate(**args)


def test_cp_stage4_llm_without_grad(base):
    """Stage 4's LLM runs without grad: one layer's gathered K/V at a time in both columns; the
    speech generator's positions are counted whole on every rank."""
    one = P.estimate(base, 4, 1, 8, 4096)
    p = P.estimate(base, 4, 1, 8, 4096, context_parallel=4)
    assert (p.activations, p.activations_checkpointed, p.logits) == \
        (one.activations, one.activations_checkpointed, one.logits)
    assert p.cp_kv_gather == p.cp_kv_gather_checkpointed > 0
    assert p.total - one.total == p.cp_transient


def test_cp_group_within_a_node_divides_the_world(base):
    # 3 nodes x 8: a CP group of 8 is one node, 3 replicas; of 4, half a node, 6 replicas
    assert P.estimate(base, 3, 3, 8, 1024, context_parallel=8).data_parallel == 3
    assert P.estimate(base, 3, 3, 8, 1024, context_parallel=4).data_parallel == 6


@pytest.mark.parametrize("argv, msg", [
    (["--context-parallel", "0"], "--context-parallel must be >= 1, got 0"),
    (["--context-parallel", "3"], "context_parallel 3 must divide gpus_per_node 8: a CP "
                                  "group's ranks are consecutive and sit within one node"),
    (["--gpus-per-node", "4", "--context-parallel", "8"], "must divide gpus_per_node 4"),
    (["--context-parallel", "two"], "invalid int value"),
])
def test_cli_bad_context_parallel(capsys, argv, msg):
    with pytest.raises(SystemExit) as e:
        P.main(["--preset", "base", "--stage", "3"] + argv)
    assert e.value.code != 0
    assert msg in capsys.readouterr().err.strip().splitlines()[-1]  # the one error line


def test_context_parallel_from_a_stage_config(tmp_path, capsys):
    cfg = tmp_path / "stage3_cp.yaml"
    cfg.write_text(
        "trainer:\n  devices: 8\n  num_nodes: 4\n"
        "model:\n  class_path: lyra_pl.training.stages.LongSpeechStage\n  init_args:\n"
        "    preset: pro\n    activation_checkpointing: true\n    hybrid_shard: true\n"
        "    context_parallel: 8\n"
        "    model_overrides:\n      lmme_blocks: 4\n      lmme_keep_ratio: 0.7\n"
        "data:\n  batch_size: 1\n  max_length: 131072\n")
    settings = P.settings_from_config(str(cfg))
    assert settings["context_parallel"] == 8 and settings["lmme"] == (4, 0.7)
    frac = ["--context-fraction", "0.95", "--answer-fraction", "0.01"]
    assert cli.main(["plan", "--config", str(cfg), "--json"] + frac) == 0
    d = json.loads(capsys.readouterr().out)
    assert (d["context_parallel"], d["data_parallel"]) == (8, 4)
    assert d["cp_transient_checkpointed"] == d["cp_lmme_gather"] > 0
    assert P.main(PRO3 + ["--context-parallel", "8", "--json"]) == 0
    spelled = json.loads(capsys.readouterr().out)
    assert d["total_checkpointed"] == spelled["total_checkpointed"]
    assert d["verdict"] == (f"fits in 80 GiB per GPU with activation checkpointing, as the "
                            f"config sets (estimate {d['total_checkpointed'] / 2**30:,.1f} GiB)")
    # a flag overrides the file
    assert P.main(["--config", str(cfg), "--context-parallel", "2", "--json"] + frac) == 0
    assert json.loads(capsys.readouterr().out)["context_parallel"] == 2
    # a config without it: no key, CP 1
    cfg.write_text(cfg.read_text().replace("    context_parallel: 8\n", ""))
    assert "context_parallel" not in P.settings_from_config(str(cfg))
