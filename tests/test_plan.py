"""The memory planner: arithmetic checked against hand computation from parameter_counts."""
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
                        "lmme": (4, 0.7), "activation_checkpointing": True}
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
