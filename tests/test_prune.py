"""context_scores / select_tokens / prune_tokens / compact against the plain-PyTorch references."""
import math
from fractions import Fraction

import pytest
import torch

from lyra_pl import _extension, ops, reference
from lyra_pl.keep_count import keep_count
from conftest import rel_err


def exact_keep(n: int, keep_ratio: float, min_keep: int) -> int:
    """Kept context tokens in exact arithmetic, ``keep_ratio`` read as the decimal it prints as
    (0.7 is 7/10 here, while 0.7 * 90 is 62.99999999999999 in double)."""
    if n < min_keep:
        return n
    r = Fraction(repr(keep_ratio))
    return max(min_keep, r.numerator * n // r.denominator)


DECIMAL_RATIOS = [0.35, 0.57, 0.7, 0.5, 0.3, 0.05, 0.333, 0.12345, 0.99999, 1.0]


def attention_inputs(B, Hq, Hkv, N, dh, dtype=torch.float64, device="cpu", seed=0):
    """Random q/k with variable valid lengths, instruction rows after a context span."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, N, dh, generator=g, dtype=torch.float64) * 2
    k = torch.randn(B, Hkv, N, dh, generator=g, dtype=torch.float64) * 2
    lengths = torch.randint(max(1, N // 2), N + 1, (B,), generator=g)
    lengths[0] = N
    pos = torch.arange(N)
    key_mask = pos < lengths[:, None]
    context = (pos >= 2) & (pos < (lengths[:, None] * 0.7).long())
    query = key_mask & ~context & (pos >= 2) & (torch.rand(B, N, generator=g) < 0.6)
    cast = dict(dtype=dtype, device=device)
    return (q.to(**cast), k.to(**cast), query.to(device), context.to(device), key_mask.to(device))


CASES = [  # (B, Hq, Hkv, N, dh): GQA groups 1, 4 and 7; tiles of 64 keys split unevenly
    (1, 1, 1, 1, 4),
    (2, 4, 4, 37, 8),
    (3, 8, 2, 130, 16),
    (2, 7, 1, 200, 32),
    (1, 28, 4, 300, 64),
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("causal", [True, False])
def test_context_scores_float64(device, case, causal):
    q, k, query, _, key = attention_inputs(*case, device=device, seed=sum(case))
    out = ops.context_scores(q, k, query, key, causal)
    ref = reference.context_scores(q, k, query, key, causal)
    assert out.dtype == torch.float64
    assert rel_err(out, ref) < 1e-6
    assert not out[~key].any()  # padding gets exactly zero


@pytest.mark.parametrize("case", CASES[1:])
@pytest.mark.parametrize("causal", [True, False])
def test_context_scores_float32(device, case, causal):
    q, k, query, _, key = attention_inputs(*case, device=device, seed=7)
    out = ops.context_scores(q.float(), k.float(), query, key, causal)
    ref = reference.context_scores(q.float().double(), k.float().double(), query, key, causal)
    assert out.dtype == torch.float32
    assert rel_err(out, ref) < 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_context_scores_half(device, dtype):
    """Half inputs, fp32 accumulation: judged against fp32 math on the same rounded inputs."""
    q, k, query, _, key = attention_inputs(2, 8, 2, 150, 32, device=device, seed=3)
    q, k = q.to(dtype), k.to(dtype)
    out = ops.context_scores(q, k, query, key)
    ref = reference.context_scores(q.double(), k.double(), query, key)
    assert out.dtype == torch.float32
    assert rel_err(out, ref) < 1e-4


def test_context_scores_strided_and_scale(device):
    """q/k in (B, N, H, dh) memory viewed as (B, H, N, dh), as attention layers produce them."""
    q, k, query, _, key = attention_inputs(2, 4, 2, 70, 16, device=device, seed=5)
    qt, kt = q.transpose(1, 2).contiguous().transpose(1, 2), k.transpose(1, 2).contiguous().transpose(1, 2)
    assert not qt.is_contiguous()
    out = ops.context_scores(qt, kt, query, key, scale=0.3)
    ref = reference.context_scores(q, k, query, key, scale=0.3)
    assert rel_err(out, ref) < 1e-6


def test_context_scores_edge_cases(device):
    q, k, query, _, key = attention_inputs(3, 4, 2, 50, 8, device=device, seed=9)
    query[1] = False  # a sample without instruction rows: all scores zero
    key[2, 10:] = False
    query[2, 5] = True
    out = ops.context_scores(q, k, query, key)
    ref = reference.context_scores(q, k, query, key)
    assert not out[1].any()
    assert rel_err(out, ref) < 1e-6
    # Each sample's scores sum to 1 (every row's softmax does) unless it has no rows.
    torch.testing.assert_close(out.sum(1)[[0, 2]], torch.ones(2, dtype=out.dtype, device=device))
    # No query row at all in the batch.
    none = ops.context_scores(q, k, torch.zeros_like(query), key)
    assert none.shape == (3, 50) and not none.any()


def test_empty_batch(device):
    q, k, query, context, key = attention_inputs(2, 4, 2, 20, 8, device=device)
    assert ops.context_scores(q[:0], k[:0], query[:0], key[:0]).shape == (0, 20)
    assert ops.prune_tokens(q[:0], k[:0], query[:0], context[:0], key[:0], 0.5).shape == (0, 20)


# ----------------------------------------------------------------------------- query positions
HEADS = [(1, 1), (4, 2), (7, 7), (6, 2)]  # (Hq, Hkv)


def positioned_inputs(seed, device="cpu"):
    """Float64 q rows at random ascending positions (random gaps) among N keys, random shapes:
    B 1..3, Nq below, equal to or above N (the extra rows masked off), rows and keys masked off
    at random, garbage positions (out of range, repeated) on the masked-off rows. With B > 1,
    sample 1 has no query rows; with B = 3, sample 2's rows see no valid key when causal."""
    g = torch.Generator().manual_seed(seed)

    def randint(lo, hi):
        return int(torch.randint(lo, hi + 1, (), generator=g))

    B, (Hq, Hkv), dh = randint(1, 3), HEADS[randint(0, 3)], (8, 16, 40)[randint(0, 2)]
    N = randint(1, 200)
    Nq = [randint(1, N), N, N + randint(1, 10)][seed % 3]  # q rows below, equal to, above N
    q = torch.randn(B, Hq, Nq, dh, generator=g, dtype=torch.float64) * 2
    k = torch.randn(B, Hkv, N, dh, generator=g, dtype=torch.float64) * 2
    key = torch.rand(B, N, generator=g) < 0.85
    query = torch.zeros(B, Nq, dtype=torch.bool)
    positions = torch.randint(-N, 2 * N, (B, Nq), generator=g)
    for b in range(B):
        T = 0 if b == 1 else randint(1, min(N, Nq))
        rows = torch.randperm(Nq, generator=g)[:T].sort().values
        query[b, rows] = True
        positions[b, rows] = torch.randperm(N, generator=g)[:T].sort().values
        if b == 2:
            key[b, : int(positions[b, rows[-1]]) + 1] = False
    return q.to(device), k.to(device), query.to(device), key.to(device), positions.to(device)


@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("causal", [True, False])
def test_context_scores_at_positions_float64(device, seed, causal):
    q, k, query, key, positions = positioned_inputs(seed, device)
    out = ops.context_scores(q, k, query, key, causal, query_positions=positions)
    ref = reference.context_scores(q, k, query, key, causal, query_positions=positions)
    assert out.dtype == torch.float64 and out.shape == key.shape
    assert rel_err(out, ref) < 1e-10
    assert not out[~key].any()  # padding gets exactly zero
    assert not out[query.sum(1) == 0].any()  # so does a sample without query rows
    if causal and len(key) == 3:
        assert not out[2].any()  # sample 2's rows see no valid key


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("causal", [True, False])
def test_context_scores_at_positions_float32(device, seed, causal):
    q, k, query, key, positions = positioned_inputs(100 + seed, device)
    q, k = q.float(), k.float()
    out = ops.context_scores(q, k, query, key, causal, query_positions=positions)
    ref = reference.context_scores(q.double(), k.double(), query, key, causal,
                                   query_positions=positions)
    assert out.dtype == torch.float32
    assert rel_err(out, ref) < 1e-4


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("causal", [True, False])
def test_own_rows_at_their_positions_equal_all_rows(device, case, causal):
    """q cut down to some positions that cover every query row, with those positions passed,
    scores exactly like the whole q (the ops' and the reference's positioned paths alike)."""
    q, k, query, _, key = attention_inputs(*case, device=device, seed=11 + sum(case))
    B, N = key.shape
    extra = torch.rand(N, generator=torch.Generator().manual_seed(N)) < 0.3
    rows = (query.any(0).cpu() | extra).nonzero().squeeze(1).to(device)
    positions = rows.expand(B, -1)  # stride 0 over the batch: no copy needed
    whole = ops.context_scores(q, k, query, key, causal)
    for impl in (ops, reference):
        own = impl.context_scores(q[:, :, rows], k, query[:, rows], key, causal,
                                  query_positions=positions)
        torch.testing.assert_close(own, whole, rtol=0, atol=1e-12)


@pytest.mark.parametrize("ranks", [2, 3, 4])
@pytest.mark.parametrize("layout", ["contiguous", "balanced"])
@pytest.mark.parametrize("causal", [True, False])
def test_rank_scores_weighted_by_rows_sum_to_the_whole(device, ranks, layout, causal):
    """Context parallelism: each rank scores all N keys from its own query rows; the ranks'
    scores weighted by their per-sample row counts add up to the whole batch's scores."""
    q, k, query, _, key = attention_inputs(3, 6, 2, 130, 16, device=device, seed=ranks)
    query[1] = False  # a sample without query rows anywhere
    B, N = key.shape
    if layout == "contiguous":  # rank r holds positions [r N / R, (r + 1) N / R)
        groups = torch.arange(N, device=device).tensor_split(ranks)
    else:  # load-balanced causal layout: rank r holds chunks r and 2R - 1 - r of 2R
        chunks = torch.arange(N, device=device).tensor_split(2 * ranks)
        groups = [torch.cat([chunks[r], chunks[2 * ranks - 1 - r]]) for r in range(ranks)]
    total = torch.zeros(B, N, dtype=torch.float64, device=device)
    for rows in groups:
        own_query = query[:, rows]
        scores = ops.context_scores(q[:, :, rows], k, own_query, key, causal,
                                    query_positions=rows.expand(B, -1))
        total += scores * own_query.sum(1, keepdim=True)
    count = query.sum(1, keepdim=True)
    combined = torch.where(count > 0, total / count.clamp(min=1), 0.0)
    whole = ops.context_scores(q, k, query, key, causal)
    torch.testing.assert_close(combined, whole, rtol=0, atol=1e-12)


def test_context_scores_at_positions_edge_cases(device):
    q, k, query, key, positions = positioned_inputs(3, device)
    B, N = key.shape
    # No query rows at all (Nq = 0): all zeros.
    none = ops.context_scores(q[:, :, :0], k, query[:, :0], key, query_positions=positions[:, :0])
    assert none.shape == (B, N) and not none.any()
    # A sample whose keys are all masked off: its rows see nothing, causal or not.
    key[0] = False
    for causal in (True, False):
        out = ops.context_scores(q, k, query, key, causal, query_positions=positions)
        ref = reference.context_scores(q, k, query, key, causal, query_positions=positions)
        assert not out[0].any()
        assert rel_err(out, ref) < 1e-10
    # No keys (N = 0): fine while every row is masked off, an error otherwise.
    empty = ops.context_scores(q, k[:, :, :0], torch.zeros_like(query), key[:, :0],
                               query_positions=positions)
    assert empty.shape == (B, 0)
    with pytest.raises(ValueError, match=r"outside \[0, 0\)"):
        ops.context_scores(q, k[:, :, :0], query, key[:, :0], query_positions=positions)


def untied_scores(B, N, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, N, generator=g, dtype=torch.float64).to(device)


@pytest.mark.parametrize("keep_ratio", [0.05, 0.3, 0.7, 1.0])
@pytest.mark.parametrize("min_keep", [0, 1, 32])
def test_select_tokens_matches_reference(device, keep_ratio, min_keep):
    for seed, (B, N) in enumerate([(1, 1), (4, 20), (3, 100), (2, 700)]):
        scores = untied_scores(B, N, device, seed)
        g = torch.Generator().manual_seed(seed)
        context = (torch.rand(B, N, generator=g) < 0.7).to(device)
        key = (torch.rand(B, N, generator=g) < 0.9).to(device)
        for dtype in (torch.float64, torch.float32):
            out = ops.select_tokens(scores.to(dtype), context, key, keep_ratio, min_keep)
            ref = reference.select_tokens(scores.to(dtype), context, key, keep_ratio, min_keep)
            assert torch.equal(out, ref)
            assert not out[~key].any()
            assert out[key & ~context].all()
            n = (context & key).sum(1)
            expected = [exact_keep(int(c), keep_ratio, min_keep) for c in n]
            assert (out & context).sum(1).tolist() == expected


def test_keep_count_is_the_exact_decimal_floor():
    assert [keep_count(n, 0.7, 32) for n in (90, 170, 180, 330)] == [63, 119, 126, 231]
    far = range(2**31 - 5000, 2**31)  # the documented bound: exact for n < 2**31
    for r in DECIMAL_RATIOS:
        for min_keep in (0, 32):
            assert [keep_count(n, r, min_keep) for n in range(5001)] \
                == [exact_keep(n, r, min_keep) for n in range(5001)], (r, min_keep)
        assert [keep_count(n, r, 0) for n in far] == [exact_keep(n, r, 0) for n in far], r


@pytest.mark.parametrize("keep_ratio", [0.35, 0.57, 0.7, 0.5, 0.3])
@pytest.mark.parametrize("min_keep", [0, 32])
def test_select_tokens_keeps_the_exact_decimal_count(device, keep_ratio, min_keep):
    # Row n has n valid context tokens, n = 0..399: among them 90, 170, 180 and 330, where
    # keep_ratio * n in double falls just below the exact count.
    N = 400
    pos = torch.arange(N, device=device)
    context = pos < pos[:, None]
    key = (pos < N - 1).expand(N, N)  # one padding column, never kept
    scores = untied_scores(N, N, device)
    expected = [exact_keep(n, keep_ratio, min_keep) for n in range(N)]
    for impl in (ops, reference):
        out = impl.select_tokens(scores, context, key, keep_ratio, min_keep)
        assert (out & context).sum(1).tolist() == expected, impl.__name__
        assert torch.equal(out & ~context, key & ~context)


def test_prune_tokens_keeps_the_exact_decimal_count(device):
    # The model's path: the extractor's select_context is ops.prune_tokens with causal=True.
    n = [90, 170, 180, 330]
    q, k, _, _, _ = attention_inputs(len(n), 4, 2, 340, 8, device=device, seed=5)
    pos = torch.arange(340, device=device)
    context = pos < torch.tensor(n, device=device)[:, None]
    query = (pos >= 332).expand(len(n), -1)
    key = torch.ones_like(context)
    for impl in (ops, reference):
        keep = impl.prune_tokens(q, k, query, context, key, 0.7, 32, True)
        assert (keep & context).sum(1).tolist() == [63, 119, 126, 231], impl.__name__
        assert keep[~context].all()


def test_select_tokens_edge_cases(device):
    scores = untied_scores(3, 40, device)
    key = torch.ones(3, 40, dtype=torch.bool, device=device)
    context = torch.zeros_like(key)
    context[0, :10] = True  # n = 10 < min_keep: all kept
    context[1] = True  # keep_ratio * 40 = 4 < min_keep = 12: 12 kept
    # sample 2: no context tokens: everything valid kept
    out = ops.select_tokens(scores, context, key, 0.1, 12)
    assert out[0].all() and out[2].all()
    assert out[1].sum() == 12
    top = torch.topk(scores[1], 12).indices
    assert out[1, top].all()


def test_select_tokens_ties_go_to_earlier_tokens(device):
    scores = torch.tensor([[0.5, 0.9, 0.5, 0.5, 0.1, 0.5]], device=device)
    ctx = torch.ones(1, 6, dtype=torch.bool, device=device)
    out = ops.select_tokens(scores, ctx, ctx, 0.5, 0)  # k = 3: 0.9 and the first two 0.5s
    assert out.tolist() == [[True, True, True, False, False, False]]
    nan = torch.tensor([[float("nan"), 0.2, 0.1]], device=device)
    ctx3 = torch.ones(1, 3, dtype=torch.bool, device=device)
    assert ops.select_tokens(nan, ctx3, ctx3, 0.67, 0).tolist() == [[False, True, True]]


@pytest.mark.parametrize("causal", [True, False])
def test_prune_tokens_is_select_of_scores(device, causal):
    q, k, query, context, key = attention_inputs(3, 8, 2, 260, 16, dtype=torch.float32,
                                                 device=device, seed=4)
    fused = ops.prune_tokens(q, k, query, context, key, 0.4, min_keep=16, causal=causal)
    scores = ops.context_scores(q, k, query, key, causal)
    assert torch.equal(fused, ops.select_tokens(scores, context, key, 0.4, 16))
    q64, k64 = q.double(), k.double()
    ref = reference.prune_tokens(q64, k64, query, context, key, 0.4, 16, causal)
    assert torch.equal(ops.prune_tokens(q64, k64, query, context, key, 0.4, 16, causal), ref)


def test_keep_ratio_one_keeps_every_valid_token(device):
    q, k, query, context, key = attention_inputs(2, 4, 2, 90, 8, device=device, seed=2)
    assert torch.equal(ops.prune_tokens(q, k, query, context, key, 1.0), key)


def test_opcheck(device):
    q, k, query, context, key = attention_inputs(2, 4, 2, 70, 8, device=device, seed=1)
    torch.library.opcheck(torch.ops.lyra.context_scores.default, (q, k, query, key, True, None))
    torch.library.opcheck(torch.ops.lyra.context_scores.default, (q.float(), k.float(), query, key, False, 0.5))
    s = ops.context_scores(q, k, query, key)
    torch.library.opcheck(torch.ops.lyra.select_tokens.default, (s, context, key, 0.5, 4))
    torch.library.opcheck(
        torch.ops.lyra.prune_tokens.default, (q, k, query, context, key, 0.5, 4, True, None)
    )
    rows = torch.arange(1, 70, 3, device=device)  # a rank's own rows, at their positions
    positions = rows.expand(2, -1).contiguous()
    own = (q[:, :, rows], k, query[:, rows], key)
    torch.library.opcheck(torch.ops.lyra.context_scores.default, (*own, True, None, positions))
    torch.library.opcheck(
        torch.ops.lyra.context_scores.default,
        (own[0].float(), k.float(), own[2], key, False, 0.5, positions),
    )


def test_torch_compile_fullgraph():
    q, k, query, context, key = attention_inputs(2, 4, 2, 80, 8, dtype=torch.float32, seed=6)
    h = torch.randn(2, 80, 5)

    def extractor_step(q, k, h):
        keep = ops.prune_tokens(q, k, query, context, key, 0.5, min_keep=4)
        return ops.compact(keep, h, key)

    compiled = torch.compile(extractor_step, fullgraph=True, backend="aot_eager", dynamic=False)
    for got, want in zip(compiled(q, k, h), extractor_step(q, k, h)):
        assert torch.equal(got, want)


# ----------------------------------------------------------------------------- tensor cores
# On a GPU of compute capability 8.0+, bfloat16/float16 inputs with head_dim a multiple of 16 (up
# to 256) take the tensor-core kernel (prune_tc_cuda.cu); float32 inputs take the FMA kernel.
needs_tensor_cores = pytest.mark.skipif(
    not (torch.cuda.is_available() and _extension.HAS_CUDA_OPS
         and torch.cuda.get_device_capability() >= (8, 0)),
    reason="needs a GPU of compute capability 8.0+ and the CUDA extension",
)


def fp32_score_tolerance(q, k, query, scale=None):
    """Bound on the relative error of each score that fp32 accumulation from bf16/fp16 inputs
    can make against float64 math on the same inputs (derived in csrc/tests/
    test_kernels_cuda.cu, fp32_score_tolerance): bf16/fp16 products are exact in fp32; a sum of
    dh of them is off by at most 2 dh u sum_d |q_d k_d| (u = 2^-24, doubled for the tensor
    cores' truncating accumulation), which moves a probability by twice that, relative (its
    logit and the log-sum-exp); plus the roundings of the N-term and Hq T-term sums, the exps
    and the base-2 logits. The largest sum_d |q_d k_d| is taken over all query rows and keys."""
    B, Hq, Nq, dh = q.shape
    kr = k.double().abs().repeat_interleave(Hq // k.shape[1], dim=1)
    max_abs_dot = torch.einsum("bhnd,bhmd->bhnm", q.double().abs(), kr).max().item()
    return score_tolerance(max_abs_dot, dh, scale, k.shape[2], Hq, int(query.sum(1).max()))


def score_tolerance(max_abs_dot, dh, scale, N, Hq, T, u=2.0**-24):
    """fp32_score_tolerance's bound from an upper bound on sum_d |q_d k_d| over the query rows
    and keys; u = 2^-53 bounds float64 accumulation the same way."""
    scale = dh**-0.5 if scale is None else scale
    logit_err = 2 * dh * u * scale * max_abs_dot
    base2_max = math.log2(math.e) * scale * max_abs_dot + math.log2(max(N, 2))
    return 2 * logit_err + (N + Hq * T + 16 + 8 * base2_max) * u


def assert_within(out, ref, tol):
    """Each score within tol relative of the float64 reference; exact zeros stay exact."""
    zero = ref == 0
    assert not out[zero].any()
    if zero.all():
        return
    err = (out.double() - ref).abs() / (tol * ref.abs() + 2.0**-120)
    assert err[~zero].max().item() <= 1, f"worst error {err[~zero].max().item():.3g} x tol {tol:.2e}"


TC_CASES = [  # (B, Hq, Hkv, N, dh): GQA groups 4, 7 and 1; Base's 28 / 4 heads and dh 128
    (3, 8, 2, 300, 64),
    (2, 7, 1, 1000, 128),
    (2, 28, 4, 130, 128),
    (2, 4, 4, 70, 256),
    (3, 6, 2, 90, 80),
]


@needs_tensor_cores
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", TC_CASES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("own_rows", [False, True])
def test_context_scores_tensor_cores_match_float64(dtype, case, causal, own_rows):
    q, k, query, _, key = attention_inputs(*case, device="cuda", seed=sum(case))
    q, k = q.to(dtype), k.to(dtype)
    query[1] = False  # a sample without query rows: all zeros
    positions = None
    if own_rows:  # q cut to the query rows and a few others, at their positions
        extra = torch.rand(case[3], generator=torch.Generator().manual_seed(1)) < 0.2
        rows = (query.any(0).cpu() | extra).nonzero().squeeze(1).cuda()
        q, query, positions = q[:, :, rows], query[:, rows], rows.expand(len(key), -1)
    out = ops.context_scores(q, k, query, key, causal, query_positions=positions)
    ref = reference.context_scores(q.double(), k.double(), query, key, causal,
                                   query_positions=positions)
    assert out.dtype == torch.float32
    assert not out[1].any() and not out[~key].any()
    assert_within(out, ref, fp32_score_tolerance(q, k, query))


def selection_margin(scores, context, key, keep_ratio, min_keep):
    """Per sample, the relative gap between the last kept and the first dropped context score
    (inf when all or none are kept): selections of scores within tol relative of these agree
    wherever the margin exceeds 2 tol."""
    margins = []
    for b in range(scores.shape[0]):
        s = scores[b][context[b] & key[b]].sort(descending=True).values
        kept = keep_count(len(s), keep_ratio, min_keep)
        margins.append(float("inf") if kept in (0, len(s)) else float((s[kept - 1] - s[kept]) / s[kept - 1]))
    return torch.tensor(margins, dtype=torch.float64)


# Inputs whose selections are well separated: at keep_ratio 0.3, min_keep 8, each sample's last
# kept and first dropped context scores differ by more than 10 tol (bf16 and fp16, causal or
# not); the test asserts it before comparing selections.
SELECT_SEED = 4


@needs_tensor_cores
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [True, False])
def test_prune_tokens_tensor_cores_select_like_fma(dtype, causal):
    q, k, query, context, key = attention_inputs(3, 8, 2, 300, 64, device="cuda", seed=SELECT_SEED)
    q, k = q.to(dtype), k.to(dtype)
    keep_ratio, min_keep = 0.3, 8
    ref = reference.context_scores(q.double(), k.double(), query, key, causal)
    tol = fp32_score_tolerance(q, k, query)
    margin = selection_margin(ref, context, key, keep_ratio, min_keep)
    assert (margin > 2 * tol).all(), f"test data: selections not well separated ({margin})"
    tc = ops.context_scores(q, k, query, key, causal)  # tensor cores
    fma = ops.context_scores(q.float(), k.float(), query, key, causal)  # FMA kernel, same values
    assert_within(tc, ref, tol)
    assert_within(fma, ref, tol)
    want = reference.select_tokens(ref, context, key, keep_ratio, min_keep)
    assert torch.equal(ops.select_tokens(tc, context, key, keep_ratio, min_keep), want)
    assert torch.equal(ops.select_tokens(fma, context, key, keep_ratio, min_keep), want)
    # The fused op takes the tensor-core path too.
    fused = ops.prune_tokens(q, k, query, context, key, keep_ratio, min_keep, causal)
    assert torch.equal(fused, want)


# ----------------------------------------------------------------------------- issue 16: shapes
# Every dtype on each device (on CUDA, bf16/fp16 with head_dim a multiple of 16 take the
# tensor-core kernel, the rest the FMA kernels), judged against float64 math on the same
# (rounded) inputs within the fp32 accumulation bound above, or its float64 twin.
ALL_DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64]


def dtype_id(dtype):
    return str(dtype).removeprefix("torch.")


def dtype_tolerance(dtype, max_abs_dot, dh, N, Hq, T):
    if dtype == torch.float64:  # the kernel and the float64 reference each err this much
        return 2 * score_tolerance(max_abs_dot, dh, None, N, Hq, T, u=2.0**-53)
    return score_tolerance(max_abs_dot, dh, None, N, Hq, T)


def chunked_reference_scores(q, k, query, key, causal):
    """reference.context_scores in float64 one sample and one query head at a time, on the
    sample's query rows only (at their positions): T x N logits per step instead of the whole
    B x Hq x T x N, so that Base's shape fits. The heads' scores average to the whole's."""
    B, Hq, _, dh = q.shape
    G = Hq // k.shape[1]
    out = torch.zeros(B, k.shape[2], dtype=torch.float64, device=q.device)
    for b in range(B):
        rows = query[b].nonzero().squeeze(1)
        if len(rows) == 0:
            continue
        every = torch.ones(1, len(rows), dtype=torch.bool, device=q.device)
        for kv in range(k.shape[1]):
            kb = k[b : b + 1, kv : kv + 1].double()
            for h in range(kv * G, (kv + 1) * G):
                out[b] += reference.context_scores(
                    q[b : b + 1, h : h + 1, rows].double(), kb, every, key[b : b + 1], causal,
                    scale=dh**-0.5, query_positions=rows[None])[0]
    return out / Hq


def max_abs_dot_bound(q, k, query):
    """max over query rows and keys of sum_d |q_d k_d|, bounded by the product of the largest
    row and key norms (Cauchy-Schwarz): cheap at any N."""
    rows = q.transpose(1, 2)[query]  # (rows, Hq, dh)
    q_norm = torch.linalg.vector_norm(rows.double(), dim=-1).max() if len(rows) else 0.0
    return float(q_norm * torch.linalg.vector_norm(k.double(), dim=-1).max())


def rows_with_a_visible_key(query, key, causal):
    """(B,) count of each sample's query rows that see at least one valid key."""
    if not causal:
        return query.sum(1) * key.any(1)
    seen = key.cumsum(1) > 0  # seen[b, p]: some valid key at or before p
    return (query & seen).sum(1)


def assert_scores_sum_to_visible_rows(out, query, key, causal, tol):
    """sum_j scores[b, j] = (rows with a visible key) / T_b: each such row's softmax sums to 1."""
    T = query.sum(1)
    want = rows_with_a_visible_key(query, key, causal).double() / T.clamp(min=1).double()
    got = out.double().sum(1)
    assert ((got - want).abs() <= tol * want + 1e-300).all(), (got, want)


def base_shape_inputs(dtype, device, seed=16):
    """Base's pruning step (Hq 28, Hkv 4, dh 128, T 256 instruction rows, N = 2^17 tokens) on
    CUDA; on the CPU the same heads with N = 1024 and T = 64, so that it runs in seconds.
    One sample; the first 600 keys (N / 16 on the CPU) are padding, so the query rows placed
    there see no valid key when causal; the other rows sit at random ascending positions."""
    N, T = (2**17, 256) if device.type == "cuda" else (1024, 64)
    g = torch.Generator(device).manual_seed(seed)
    q = (torch.randn(1, 28, N, 128, generator=g, device=device, dtype=torch.float32) * 2).to(dtype)
    k = (torch.randn(1, 4, N, 128, generator=g, device=device, dtype=torch.float32) * 2).to(dtype)
    pad = 600 if device.type == "cuda" else N // 16
    key = torch.rand(1, N, generator=g, device=device) < 0.9
    key[:, :pad] = False
    early = torch.randperm(pad, generator=g, device=device)[:5]
    late = pad + torch.randperm(N - pad, generator=g, device=device)[: T - 5]
    query = torch.zeros(1, N, dtype=torch.bool, device=device)
    query[0, torch.cat([early, late])] = True
    return q, k, query, key


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
def test_context_scores_base_shape(device, dtype):
    """Base's shape (N = 2^17 on CUDA), causal: each score within the dtype's bound of a chunked
    float64 reference, and each sample's scores summing to its rows with a visible key / T."""
    q, k, query, key = base_shape_inputs(dtype, device)
    out = ops.context_scores(q, k, query, key, True)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    ref = chunked_reference_scores(q, k, query, key, True)
    N, T = key.shape[1], int(query.sum())
    tol = dtype_tolerance(dtype, max_abs_dot_bound(q, k, query), 128, N, 28, T)
    assert_within(out, ref, tol)
    assert rows_with_a_visible_key(query, key, True).item() <= T - 5  # the rows in the padding
    assert_scores_sum_to_visible_rows(out, query, key, True, tol)


SWEEP_BASE = dict(dh=64, G=4, N=130, T=20)
SWEEP = (  # one factor at a time around SWEEP_BASE; Hkv = 2, so Hq = 2 G
    [dict(SWEEP_BASE, dh=dh) for dh in (16, 80, 96, 256)]
    + [dict(SWEEP_BASE, G=G) for G in (1, 7)]
    + [dict(SWEEP_BASE, N=N, T=min(N, SWEEP_BASE["T"])) for N in (1, 63, 64, 65)]
    + [dict(SWEEP_BASE, T=T) for T in (1, 64, 65)]
    + [SWEEP_BASE]
)


def sweep_inputs(dh, G, N, T, dtype, device, seed):
    """Three samples: 0 with T query rows at random positions and 90% valid keys (key 0 always
    valid, so its first row sees a key); 1 without query rows; 2 with T query rows and every
    key masked off."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(3, 2 * G, N, dh, generator=g, dtype=torch.float64) * 2
    k = torch.randn(3, 2, N, dh, generator=g, dtype=torch.float64) * 2
    key = torch.rand(3, N, generator=g) < 0.9
    key[0, 0] = True
    key[2] = False
    query = torch.zeros(3, N, dtype=torch.bool)
    for b in (0, 2):
        query[b, torch.randperm(N, generator=g)[:T]] = True
    cast = dict(dtype=dtype, device=device)
    return q.to(**cast), k.to(**cast), query.to(device), key.to(device)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", SWEEP, ids=lambda s: "dh{dh}-G{G}-N{N}-T{T}".format(**s))
@pytest.mark.parametrize("causal", [True, False])
def test_context_scores_shape_sweep(device, dtype, shape, causal):
    """head_dim 16..256, GQA groups 1/4/7, N and T around the 64-wide tiles, a sample without
    query rows and one with every key masked off; then no query row in the whole batch."""
    q, k, query, key = sweep_inputs(**shape, dtype=dtype, device=device,
                                    seed=shape["dh"] + 7 * shape["G"] + 31 * shape["N"] + shape["T"])
    out = ops.context_scores(q, k, query, key, causal)
    ref = reference.context_scores(q.double(), k.double(), query, key, causal)
    qd, kd = q.double(), k.double()
    kr = kd.abs().repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    max_abs_dot = torch.einsum("bhnd,bhmd->bhnm", qd.abs(), kr).max().item()
    tol = dtype_tolerance(dtype, max_abs_dot, shape["dh"], shape["N"], q.shape[1], shape["T"])
    assert_within(out, ref, tol)
    assert not out[1].any() and not out[2].any()
    assert_scores_sum_to_visible_rows(out, query, key, causal, tol)
    none = ops.context_scores(q, k, torch.zeros_like(query), key, causal)
    assert none.shape == key.shape and not none.any()


# ----------------------------------------------------------------------------- issue 16: selection
def test_select_reference_ranks_nan_candidates_above_other_tokens(device):
    """With fewer numeric scores than k, the NaN-scored context tokens fill the selection, in
    token order; never padding or non-context tokens (the reference once ranked them alike)."""
    nan = float("nan")
    scores = torch.tensor([[nan, nan, 0.3, nan, nan, 0.1],   # token 0: padding
                           [1.0, nan, nan, 0.5, 0.0, 0.0]],  # token 0: not context
                          device=device)
    key = torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], dtype=torch.bool, device=device)
    context = torch.tensor([[1, 1, 1, 0, 1, 1], [0, 1, 1, 1, 1, 1]], dtype=torch.bool,
                           device=device)
    # n = 4 and 3 candidates, k = 3 and 2: the numbers, then the first NaN candidate.
    want = [[False, True, True, True, False, True], [True, True, False, True, False, False]]
    for impl in (reference, ops):
        for dtype in (torch.float32, torch.float64):
            assert impl.select_tokens(scores.to(dtype), context, key, 0.75, 0).tolist() == want, \
                (impl.__name__, dtype)


def special_scores(pattern, B, N, dtype, seed):
    """Scores that stress the order: all ties, +-0, NaN, +-inf, subnormals, or all of them."""
    g = torch.Generator().manual_seed(seed)
    tiny = torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps  # the least subnormal
    pick = lambda *values: torch.tensor(values, dtype=torch.float64)[  # noqa: E731
        torch.randint(len(values), (B, N), generator=g)]
    uniform = torch.rand(B, N, generator=g, dtype=torch.float64)
    subnormal = (torch.randint(-50, 51, (B, N), generator=g).double() * tiny).to(dtype).double()
    inf = float("inf")
    if pattern == "ties":
        s = torch.full((B, N), 0.25, dtype=torch.float64)
    elif pattern == "zeros":
        s = pick(0.0, -0.0, 1e-3, -1e-3)
    elif pattern == "nan":
        s = torch.where(torch.rand(B, N, generator=g) < 0.4, float("nan"), uniform)
    elif pattern == "inf":
        s = torch.where(torch.rand(B, N, generator=g) < 0.5, pick(inf, -inf), uniform)
    elif pattern == "subnormal":
        s = subnormal
    else:  # mixed
        s = torch.where(torch.rand(B, N, generator=g) < 0.5,
                        pick(float("nan"), inf, -inf, 0.0, -0.0, 0.25, 0.25, 1e-3), subnormal)
    return s.to(dtype)


def selection_masks(B, N, seed):
    """Sample 0 all valid with 70% context, sample 1 with 80% valid and 60% context, sample 2
    all context with 10% padding; more samples repeat the pattern."""
    g = torch.Generator().manual_seed(seed)
    r = torch.rand(B, N, generator=g)
    kind = torch.arange(B)[:, None] % 3
    key = torch.where(kind == 0, True, torch.where(kind == 1, r < 0.8, r < 0.9))
    context = torch.where(kind == 0, r < 0.7, torch.where(kind == 1, r < 0.6, True))
    return context, key


KEEP_SETTINGS = [  # (keep_ratio, min_keep)
    (0.3, 0),
    (0.5, 7),
    (0.3, 10**6),  # min_keep > n: every context token kept
    (1e-9, 0),  # k = 0: none kept
]
PATTERNS = ["ties", "zeros", "nan", "inf", "subnormal", "mixed"]


def check_selection(device, scores, context, key, keep_ratio, min_keep):
    """The op on `device`, the reference and the CPU op select alike, and the exact count."""
    s, c, kk = scores.to(device), context.to(device), key.to(device)
    out = ops.select_tokens(s, c, kk, keep_ratio, min_keep)
    assert torch.equal(out, reference.select_tokens(s, c, kk, keep_ratio, min_keep))
    if out.device.type != "cpu":
        assert torch.equal(out.cpu(), ops.select_tokens(scores, context, key, keep_ratio, min_keep))
    n = (context & key).sum(1).tolist()
    assert (out & c).sum(1).tolist() == [exact_keep(x, keep_ratio, min_keep) for x in n]
    assert not out[~kk].any() and out[kk & ~c].all()


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("N", [1, 511, 512, 513])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
def test_select_tokens_special_scores(device, pattern, N, dtype):
    """N around the CUDA kernel's 512-token chunks, scores full of ties, signed zeros, NaN,
    infinities and subnormals, k from 0 to all."""
    context, key = selection_masks(3, N, seed=N)
    scores = special_scores(pattern, 3, N, dtype, seed=N + len(pattern))
    for keep_ratio, min_keep in KEEP_SETTINGS:
        check_selection(device, scores, context, key, keep_ratio, min_keep)


def test_select_tokens_large_batch(device):
    """B = 64 samples of N = 2^17 tokens on CUDA (2^12 on the CPU), every special value."""
    N = 2**17 if device.type == "cuda" else 2**12
    context, key = selection_masks(64, N, seed=64)
    for dtype in (torch.float32, torch.float64):
        scores = special_scores("mixed", 64, N, dtype, seed=1)
        scores[::2] = untied_scores(32, N, "cpu", seed=2).to(dtype)  # and untied samples
        for keep_ratio, min_keep in KEEP_SETTINGS:
            check_selection(device, scores, context, key, keep_ratio, min_keep)


def test_prune_tokens_large_batch(device):
    """prune_tokens at B = 64, N = 2^17 (2^12 on the CPU) in float64: the fused op, its two
    steps, the reference and the CPU op keep the same tokens."""
    N = 2**17 if device.type == "cuda" else 2**12
    g = torch.Generator(device).manual_seed(5)
    q = torch.randn(64, 1, N, 16, generator=g, device=device, dtype=torch.float64)
    k = torch.randn(64, 1, N, 16, generator=g, device=device, dtype=torch.float64)
    context, key = selection_masks(64, N, seed=5)
    query = key & ~context & (torch.arange(N) >= N - 64)  # up to 64 instruction rows at the end
    context, key, query = context.to(device), key.to(device), query.to(device)
    scores = ops.context_scores(q, k, query, key)
    ref_scores = chunked_reference_scores(q, k, query, key, True)
    for i, (keep_ratio, min_keep) in enumerate(KEEP_SETTINGS[:2]):
        keep = ops.prune_tokens(q, k, query, context, key, keep_ratio, min_keep)
        assert torch.equal(keep, ops.select_tokens(scores, context, key, keep_ratio, min_keep))
        assert torch.equal(keep, reference.select_tokens(ref_scores, context, key, keep_ratio,
                                                         min_keep))
        if keep.device.type != "cpu" and i == 0:
            cpu = ops.prune_tokens(q.cpu(), k.cpu(), query.cpu(), context.cpu(), key.cpu(),
                                   keep_ratio, min_keep)
            assert torch.equal(keep.cpu(), cpu)


# ----------------------------------------------------------------------------- compact
def test_compact(device):
    B, N = 3, 9
    keep = torch.tensor(
        [[1, 0, 1, 1, 0, 0, 1, 0, 0], [0] * 9, [1] * 9], dtype=torch.bool, device=device
    )
    hidden = torch.randn(B, N, 4, device=device)
    labels = torch.arange(B * N, device=device).reshape(B, N)
    pos = torch.stack([labels, labels + 100, labels + 200])  # (3, B, N) M-RoPE positions
    h2, l2, p2, lengths = ops.compact(keep, hidden, labels, pos, pad_value=(0.0, -100, -1))
    assert lengths.tolist() == [4, 0, 9]
    assert h2.shape == (B, 9, 4) and l2.shape == (B, 9) and p2.shape == (3, B, 9)
    assert torch.equal(h2[0, :4], hidden[0, [0, 2, 3, 6]]) and not h2[0, 4:].any()
    assert l2[0].tolist() == [0, 2, 3, 6] + [-100] * 5
    assert (l2[1] == -100).all() and torch.equal(l2[2], labels[2])
    assert torch.equal(p2[1, 0, :4], pos[1, 0, [0, 2, 3, 6]]) and (p2[:, 0, 4:] == -1).all()
    # New length is the batch maximum of kept tokens.
    h3, n3 = ops.compact(keep[:2], hidden[:2])
    assert h3.shape == (2, 4, 4) and n3.tolist() == [4, 0]


# ----------------------------------------------------------------------------- bad input
def test_errors_name_the_problem():
    q, k, query, context, key = attention_inputs(2, 4, 2, 20, 8)
    with pytest.raises(ValueError, match=r"query heads \(4\) must be a multiple of the number of kv heads \(3\)"):
        ops.context_scores(q, torch.randn(2, 3, 20, 8, dtype=q.dtype), query, key)
    with pytest.raises(ValueError, match="must match q .* in batch, tokens and head_dim"):
        ops.context_scores(q, k[:, :, :10], query, key)
    with pytest.raises(TypeError, match="k has dtype torch.float32 but q has torch.float64"):
        ops.context_scores(q, k.float(), query, key)
    with pytest.raises(TypeError, match="query_mask must be a bool tensor"):
        ops.context_scores(q, k, query.int(), key)
    with pytest.raises(ValueError, match=r"key_mask must have shape \(2, 20\)"):
        ops.context_scores(q, k, query, key[:, :5])
    with pytest.raises(ValueError, match=r"q and k must be \(B, Hq, N, head_dim\)"):
        ops.context_scores(q[0], k, query, key)
    with pytest.raises(ValueError, match=r"keep_ratio must be in \(0, 1\]"):
        ops.prune_tokens(q, k, query, context, key, 1.5)
    with pytest.raises(ValueError, match=r"keep_ratio must be in \(0, 1\]"):
        ops.select_tokens(torch.rand(2, 20), context, key, 0.0)
    with pytest.raises(ValueError, match="min_keep must be an int >= 0"):
        ops.select_tokens(torch.rand(2, 20), context, key, 0.5, -1)
    with pytest.raises(ValueError, match=r"query heads \(4\) must be a multiple"):
        torch.ops.lyra.context_scores(q, torch.randn(2, 3, 20, 8, dtype=q.dtype), query, key, True, None)
    with pytest.raises(ValueError, match="need at least one head each"):
        ops.context_scores(q[:, :0], k, query, key)
    with pytest.raises(ValueError, match="need at least one head each"):
        ops.context_scores(q, k[:, :0], query, key)
    with pytest.raises(ValueError, match="at least one head"):
        torch.ops.lyra.context_scores(q[:, :0], k, query, key, True, None)
    with pytest.raises(ValueError, match="min_keep must be an int >= 0"):
        ops.select_tokens(torch.rand(2, 20), context, key, 0.5, True)
    with pytest.raises(ValueError, match=r"keep must be a \(B, N\) bool tensor"):
        ops.compact(key.int(), q)
    with pytest.raises(ValueError, match=r"tensors\[0\] has shape"):
        ops.compact(key, torch.zeros(2, 7))


def test_query_positions_errors():
    q, k, query, _, key = attention_inputs(2, 4, 2, 64, 8)
    positions = torch.arange(64).expand(2, -1).clone()
    positions[~query] = -7  # masked-off rows: ignored whatever their value
    ops.context_scores(q, k, query, key, query_positions=positions)
    last = int(query[0].nonzero()[-1])
    beyond = positions.clone()
    beyond[0, last] = 70
    below = positions.clone()
    below[1, int(query[1].nonzero()[0])] = -1
    repeated = positions.clone()
    second = query[1].nonzero()[1]
    repeated[1, second] = repeated[1, query[1].nonzero()[0]]

    def both(*args):  # the typed wrapper and the op itself
        yield lambda: ops.context_scores(*args[:4], query_positions=args[4])
        yield lambda: torch.ops.lyra.context_scores(*args[:4], True, None, args[4])

    cases = [
        (beyond, r"^query_positions: sample 0 has position 70 \(query row \d+\) outside \[0, 64\)$"),
        (below, r"^query_positions: sample 1 has position -1 \(query row \d+\) outside \[0, 64\)$"),
        (repeated, r"^query_positions: sample 1 is not strictly ascending over its query rows"),
    ]
    for bad, message in cases:
        for call in both(q, k, query, key, bad):
            with pytest.raises(ValueError, match=message) as info:
                call()
            assert "\n" not in str(info.value)
    for call in both(q, k, query, key, positions.int()):
        with pytest.raises(TypeError, match="query_positions must be an int64 tensor"):
            call()
    for call in both(q, k, query, key, positions[:, :63]):
        with pytest.raises(ValueError, match="query_positions"):
            call()
    with pytest.raises(ValueError, match=r"query_positions must have shape \(B, Nq\) = \(2, 64\)"):
        ops.context_scores(q, k, query, key, query_positions=positions[:1])
    with pytest.raises(TypeError, match="query_positions must be a torch.Tensor"):
        ops.context_scores(q, k, query, key, query_positions=[0, 1])
    # Nq != N needs positions; with them, query_mask follows q and key_mask follows k.
    with pytest.raises(ValueError, match="must match q .* in batch, tokens and head_dim"):
        ops.context_scores(q[:, :, :10], k, query[:, :10], key)
    with pytest.raises(ValueError, match=r"k.shape\[2\] \(tokens\) must be 10"):
        torch.ops.lyra.context_scores(q[:, :, :10], k, query[:, :10], key, True, None)
    with pytest.raises(ValueError, match=r"query_mask must have shape \(2, 10\)"):
        ops.context_scores(q[:, :, :10], k, query, key, query_positions=positions[:, :10])
    with pytest.raises(ValueError, match="must match q .* in batch and head_dim"):
        ops.context_scores(q[:, :, :10], k[..., :4], query[:, :10], key,
                           query_positions=positions[:, :10])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_mixed_devices_rejected():
    q, k, query, context, key = attention_inputs(2, 4, 2, 20, 8)
    with pytest.raises(ValueError, match="is on cpu but q is on cuda"):
        ops.context_scores(q.cuda(), k.cuda(), query, key.cuda())
    positions = torch.arange(20).expand(2, -1)
    with pytest.raises(ValueError, match="query_positions is on cpu but q is on cuda"):
        ops.context_scores(q.cuda(), k.cuda(), query.cuda(), key.cuda(), query_positions=positions)
    with pytest.raises(ValueError, match="query_positions is on cpu but q is on cuda"):
        torch.ops.lyra.context_scores(q.cuda(), k.cuda(), query.cuda(), key.cuda(), True, None,
                                      positions)
