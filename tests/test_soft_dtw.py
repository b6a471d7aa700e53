"""lyra_pl.ops.soft_dtw and lcmr_loss against the float64 plain-PyTorch references."""
import pytest
import torch

from lyra_pl import _extension, ops, reference
from conftest import rel_err


def cost_matrix(B, L, S, dtype=torch.float64, device="cpu", seed=0):
    """An LCMR-like cost: -log softmax of random logits (positive, a few units large)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, L, S, generator=g, dtype=torch.float64) * 3
    return (-torch.log_softmax(logits, -1)).to(dtype=dtype, device=device)


def random_lengths(B, Lmax, Smax, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(1, Lmax + 1, (B,), generator=g)
    y = torch.randint(1, Smax + 1, (B,), generator=g)
    x[0], y[0] = Lmax, Smax  # the padded size itself is always exercised
    return x, y


def value_and_grad(fn, D, x, y, **kw):
    D = D.detach().clone().requires_grad_()
    v = fn(D, x, y, **kw)
    w = torch.linspace(0.5, 1.5, v.numel(), dtype=v.dtype, device=v.device)  # distinct per sample
    (g,) = torch.autograd.grad((v * w).sum(), D)
    return v.detach(), g


# (B, Lmax, Smax): L=1, S=1, S > L, square, and a long sample next to short ones.
SHAPES = [(1, 1, 1), (3, 1, 7), (3, 9, 1), (4, 5, 23), (5, 17, 11), (2, 30, 30), (6, 64, 13)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("gamma", [0.1, 1.0])
def test_matches_reference_float64(device, shape, gamma):
    B, L, S = shape
    for seed in range(3):
        D = cost_matrix(B, L, S, device=device, seed=seed)
        x, y = (t.to(device) for t in random_lengths(B, L, S, seed))
        v, g = value_and_grad(ops.soft_dtw, D, x, y, gamma=gamma)
        rv, rg = value_and_grad(reference.soft_dtw, D, x, y, gamma=gamma)
        assert rel_err(v, rv) < 1e-6
        assert rel_err(g, rg) < 1e-6
        for b in range(B):  # exactly zero gradient outside each sample's region
            assert not g[b, x[b]:].any() and not g[b, :, y[b]:].any()


@pytest.mark.parametrize("bandwidth", [0, 1, 3, 10])
def test_bandwidth_matches_reference(device, bandwidth):
    B, L, S = 5, 20, 18
    D = cost_matrix(B, L, S, device=device, seed=bandwidth)
    x = torch.tensor([18, 7, 12, 3, 15], device=device)
    offset = torch.tensor([2, 0, -1, 1, 0], device=device).clamp(-bandwidth, bandwidth)
    y = (x - offset).clamp(1, S)  # |x - y| <= bandwidth, so the end cell is in the band
    v, g = value_and_grad(ops.soft_dtw, D, x, y, bandwidth=bandwidth)
    rv, rg = value_and_grad(reference.soft_dtw, D, x, y, bandwidth=bandwidth)
    assert torch.isfinite(v).all()
    assert rel_err(v, rv) < 1e-6 and rel_err(g, rg) < 1e-6


def test_one_long_sample_among_short_ones(device):
    L, S = 400, 90
    D = cost_matrix(4, L, S, device=device, seed=7)
    x = torch.tensor([L, 3, 10, 1], device=device)
    y = torch.tensor([S, 90, 2, 1], device=device)
    v, g = value_and_grad(ops.soft_dtw, D, x, y)
    rv, rg = value_and_grad(reference.soft_dtw, D, x, y)
    assert rel_err(v, rv) < 1e-6 and rel_err(g, rg) < 1e-6


def test_padding_content_is_ignored(device):
    D = cost_matrix(3, 12, 9, device=device)
    x, y = torch.tensor([12, 5, 2], device=device), torch.tensor([4, 9, 1], device=device)
    D2 = D.clone()
    for b in range(3):
        D2[b, x[b]:] = torch.nan
        D2[b, :, y[b]:] = 1e30
    v, g = value_and_grad(ops.soft_dtw, D, x, y)
    v2, g2 = value_and_grad(ops.soft_dtw, D2, x, y)
    assert torch.equal(v, v2) and torch.equal(g, g2)


def analytic(D, x, y, **kw):
    """The second reference (R/E matrices, no autograd), weighted like value_and_grad."""
    v, g = reference.soft_dtw_value_and_grad(D, x, y, **kw)
    w = torch.linspace(0.5, 1.5, v.numel(), dtype=v.dtype, device=v.device)
    return v, g * w[:, None, None]


@pytest.mark.parametrize("bandwidth", [None, 2])
def test_the_two_references_agree(bandwidth):
    D = cost_matrix(4, 15, 13, seed=2)
    x, y = torch.tensor([15, 4, 9, 1]), torch.tensor([13, 5, 9, 1])
    if bandwidth is not None:
        y = torch.tensor([13, 5, 9, 1]).clamp(min=(x - 2).clamp(min=1), max=x + 2)
    v, g = value_and_grad(reference.soft_dtw, D, x, y, bandwidth=bandwidth)
    av, ag = analytic(D, x, y, bandwidth=bandwidth)
    assert rel_err(v, av) < 1e-12 and rel_err(g, ag) < 1e-10


# |dD float32 - dD float64| bound. Both backends pass each cell's E through its stored weights
# normalized to sum 1 (CUDA divides by the sum, the CPU multiplies by 2 - sum, the same to
# second order): E is then the visit probability of a Markov chain whose transitions sum to 1,
# and the float32 rounding of the weights costs ~1.5e-8 whatever L + S. Unnormalized, E drifted
# by ~1.2e-10 x (L + S): 6e-7 at L + S = 5500, 2.7e-6 at 21000.
F32_GRAD_TOL = 2e-7


@pytest.mark.parametrize("L,S", [(4500, 1000), (20000, 1000)])
def test_float32_long_sequence_accuracy(device, L, S):
    """Long sequences, where every float32 peer loses the gradient (issue #2): the bound
    does not grow with L + S."""
    D32 = cost_matrix(1, L, S, seed=3).float()
    x, y = torch.tensor([L]), torch.tensor([S])
    v32, g32 = value_and_grad(ops.soft_dtw, D32.to(device), x.to(device), y.to(device))
    v64, g64 = analytic(D32, x, y)  # float64 on the same (float32-representable) costs
    assert rel_err(v32.cpu(), v64) < 1e-5
    assert (g32.cpu().double() - g64).abs().max().item() < F32_GRAD_TOL
    assert g64.abs().max() > 0.5  # the alignment path carries real gradient mass


def test_variable_lengths_float32(device):
    D = cost_matrix(8, 300, 60, dtype=torch.float32, device=device, seed=11)
    x, y = (t.to(device) for t in random_lengths(8, 300, 60, 11))
    v, g = value_and_grad(ops.soft_dtw, D, x, y)
    rv, rg = analytic(D.cpu(), x.cpu(), y.cpu())
    assert rel_err(v.cpu(), rv) < 1e-5
    assert (g.cpu().double() - rg).abs().max().item() < 1e-4


def test_nan_cost_propagates(device):
    """A NaN inside the valid region (a diverging model) must show, not be soft-min'ed away."""
    D = cost_matrix(2, 6, 5, device=device)
    D[0, 2, 2] = float("nan")
    x, y = torch.tensor([6, 6], device=device), torch.tensor([5, 5], device=device)
    v, g = value_and_grad(ops.soft_dtw, D, x, y)
    assert torch.isnan(v[0]) and torch.isnan(g[0]).any()
    assert torch.isfinite(v[1]) and torch.isfinite(g[1]).all()
    assert torch.isnan(reference.soft_dtw(D, x, y)[0])


@pytest.mark.parametrize("B", [1, 3])
def test_samples_split_into_stripes_across_threads(B):
    """Fewer samples than work items for the threads: each sample's rows are cut into stripes
    that threads run as a pipeline, trading one row of R (forward) or of what E passes up
    (backward) per diagonal. Against the analytic float64 gradient, with and without a band,
    variable lengths; and bitwise equal to one thread, whose single stripe per sample runs the
    same arithmetic cell by cell."""
    threads = torch.get_num_threads()
    D = cost_matrix(B, 700, 650, seed=4)
    x = torch.tensor([700, 455, 130][:B])
    y = torch.tensor([650, 630, 90][:B])
    try:
        for bandwidth in (None, 300):
            runs = {}
            for n in (1, 2, 3):
                torch.set_num_threads(n)
                runs[n] = value_and_grad(ops.soft_dtw, D, x, y, bandwidth=bandwidth)
            av, ag = analytic(D, x, y, bandwidth=bandwidth)
            v, g = runs[2]
            assert rel_err(v, av) < 1e-10 and rel_err(g, ag) < 1e-8
            for n in (2, 3):
                assert torch.equal(runs[n][0], runs[1][0]) and torch.equal(runs[n][1], runs[1][1])
            D32 = D.float()
            torch.set_num_threads(1)
            one = value_and_grad(ops.soft_dtw, D32, x, y, bandwidth=bandwidth)
            torch.set_num_threads(2)
            two = value_and_grad(ops.soft_dtw, D32, x, y, bandwidth=bandwidth)
            assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("bandwidth", [None, 0, 2])
def test_nan_where_the_smallest_predecessor_is_inf(device, bandwidth):
    """A NaN cost whose successors' other predecessors are +inf (row 0, column 0, the band's
    edges, band 0): R and all three weights of those cells are NaN on every backend (issue 16:
    CUDA stored weight 0 there), so dD is NaN exactly where the float64 autograd reference
    has NaN. Samples fill D (padding would add NaN at the reference's invalid cells)."""
    designs = {  # (L, S): NaN cost cells
        None: [((1, 7), [(0, 2)]), ((7, 1), [(3, 0)]), ((6, 6), [(0, 0)]), ((6, 6), [(5, 5)])],
        0: [((6, 6), [(2, 2)]), ((1, 1), [(0, 0)])],
        2: [((8, 8), [(0, 0)]), ((8, 7), [(0, 2)]), ((7, 8), [(3, 1), (6, 7)])],
    }[bandwidth]
    for (L, S), cells in designs:
        D = cost_matrix(2, L, S, seed=L * 10 + S)
        for i, j in cells:
            D[0, i, j] = float("nan")
        x, y = torch.tensor([L, L]), torch.tensor([S, S])
        v, g = value_and_grad(ops.soft_dtw, D.to(device), x.to(device), y.to(device), bandwidth=bandwidth)
        rv, rg = value_and_grad(reference.soft_dtw, D, x, y, bandwidth=bandwidth)
        v, g = v.cpu(), g.cpu()
        assert torch.equal(v.isnan(), rv.isnan()) and torch.isnan(v[0]) and torch.isfinite(v[1])
        assert torch.equal(g.isnan(), rg.isnan()), (L, S, cells)
        finite = ~rg.isnan()
        assert (g[finite] - rg[finite]).abs().max() < 1e-10


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cuda_weights_and_gradients_match_cpu(dtype):
    """Both backends write the same weight layout (soft_dtw.h) and the same NaN semantics: the
    CUDA weights equal the CPU's, NaN where the CPU's are (NaN costs beside +inf predecessors
    included), and so do values and gradients."""
    D = cost_matrix(4, 12, 10, dtype=dtype, seed=9)
    D[0, 0, 3] = D[1, 5, 0] = D[2, 0, 0] = float("nan")
    x, y = torch.tensor([12, 9, 10, 12]), torch.tensor([10, 10, 9, 10])
    # float32: the CPU computes the soft-min terms in float32, CUDA in float64.
    tol = 1e-12 if dtype == torch.float64 else 1e-5

    def close(a, b):  # same NaN, and within tol relative to the largest entry
        return torch.equal(a.isnan(), b.isnan()) and rel_err(a.nan_to_num(), b.nan_to_num()) < tol

    grad = torch.tensor([1.0, -0.5, 2.0, 0.25], dtype=dtype)
    for bandwidth in (-1, 2):
        v, w = torch.ops.lyra.soft_dtw_forward(D, x, y, 0.3, bandwidth, True)
        vc, wc = torch.ops.lyra.soft_dtw_forward(D.cuda(), x.cuda(), y.cuda(), 0.3, bandwidth, True)
        assert close(vc.cpu(), v) and close(wc.cpu(), w)
        dD = torch.ops.lyra.soft_dtw_backward(grad, w, x, y, bandwidth)
        dDc = torch.ops.lyra.soft_dtw_backward(grad.cuda(), wc, x.cuda(), y.cuda(), bandwidth)
        assert close(dDc.cpu(), dD)


def test_huge_bandwidth_is_no_band(device):
    """A band of Lmax + Smax or more, up to 2^63 - 1, excludes nothing: the same values and
    gradients as no band (issue 16: such a band overflowed d + bandwidth in the kernels)."""
    D = cost_matrix(3, 9, 7, device=device, seed=12)
    x, y = torch.tensor([9, 4, 1], device=device), torch.tensor([7, 7, 2], device=device)
    v, g = value_and_grad(ops.soft_dtw, D, x, y)
    for bandwidth in (16, 2**31 - 2, 2**31 - 1, 2**63 - 1):
        vb, gb = value_and_grad(ops.soft_dtw, D, x, y, bandwidth=bandwidth)
        assert torch.equal(v, vb) and torch.equal(g, gb)


def test_past_2_31_elements(device):
    """B x Lmax x Smax > 2^31 (int64 offsets): 2049 samples of 1024 x 1024 cells, float32. Most
    samples are 1 x 1; four of full or odd size, the last two past element 2^31, are checked
    against the same op on their own slices, where offsets are small. CPU: the value only, from a
    D whose untouched pages are never read (torch.empty does not write them), so it needs ~50 MB
    of memory; CUDA: value and gradient, 44 GB of device memory (skipped with less)."""
    B, L, S = 2049, 1024, 1024
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info()
        if free < 44e9:
            pytest.skip(f"needs 44 GB of free device memory, {free / 1e9:.1f} GB free")
    try:
        D = torch.empty(B, L, S, dtype=torch.float32, device=device)
    except RuntimeError as e:  # a CPU machine that does not overcommit memory
        pytest.skip(f"cannot reserve 8.6 GB for D: {e}")
    D[:, 0, 0] = 1.0
    x, y = torch.ones(B, dtype=torch.long), torch.ones(B, dtype=torch.long)
    checked = {0: (1024, 1024), 1500: (300, 1000), 2047: (1024, 9), 2048: (517, 1024)}
    for b, (lb, sb) in checked.items():
        D[b, :lb, :sb] = cost_matrix(1, lb, sb, seed=b)[0].float().to(device)
        x[b], y[b] = lb, sb
    x, y = x.to(device), y.to(device)
    grad = device.type == "cuda"
    with torch.set_grad_enabled(grad):
        v = ops.soft_dtw(D.requires_grad_(grad), x, y)
        g = torch.autograd.grad(v.sum(), D)[0] if grad else None
    # Each checked sample equals the same op on its own slice (small offsets), bit for bit: a
    # cell's arithmetic does not depend on where the sample sits in the batch.
    for b, (lb, sb) in checked.items():
        one = D[b : b + 1, :lb, :sb].detach().contiguous()
        with torch.set_grad_enabled(grad):
            vb = ops.soft_dtw(one.requires_grad_(grad), x[b : b + 1], y[b : b + 1])
        assert torch.equal(v[b : b + 1].detach(), vb.detach())
        if grad:
            assert torch.equal(g[b, :lb, :sb], torch.autograd.grad(vb.sum(), one)[0][0])
            assert not g[b, lb:].any() and not g[b, :, sb:].any()
    assert torch.equal(v[1:1500].detach().cpu(), torch.ones(1499))  # 1 x 1 samples: their cost


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_global_scratch_past_shared_memory():
    """Three live diagonals of min(Lmax, Smax) doubles past the device's opt-in shared memory per
    block (9,686 on an H100): the kernels keep them in the workspace instead, reached by size
    rather than forced (LYRA_SOFT_DTW_GLOBAL_SCRATCH). A narrow band keeps the work small;
    against the CPU backend, float64."""
    props = torch.cuda.get_device_properties(0)
    n = getattr(props, "shared_memory_per_block_optin", 232448) // 24 + 1
    D = torch.rand(2, n, n, generator=torch.Generator().manual_seed(13), dtype=torch.float64) * 4
    x, y = torch.tensor([n, 70]), torch.tensor([n - 25, 61])
    v, g = value_and_grad(ops.soft_dtw, D, x, y, bandwidth=40)
    vc, gc = value_and_grad(ops.soft_dtw, D.cuda(), x.cuda(), y.cuda(), bandwidth=40)
    assert rel_err(vc.cpu(), v) < 1e-12 and rel_err(gc.cpu(), g) < 1e-10


def test_value_without_stored_weights(device):
    D = cost_matrix(3, 9, 7, device=device)
    x, y = torch.tensor([9, 4, 1], device=device), torch.tensor([7, 7, 2], device=device)
    with_w, w = torch.ops.lyra.soft_dtw_forward(D, x, y, 0.1, -1, True)
    without, empty = torch.ops.lyra.soft_dtw_forward(D, x, y, 0.1, -1, False)
    assert torch.equal(with_w, without) and empty.numel() == 0
    with torch.no_grad():  # no weights are stored when no backward can follow
        assert torch.equal(ops.soft_dtw(D.requires_grad_(), x, y), without)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_are_upcast(device, dtype):
    D = cost_matrix(2, 10, 6, dtype=dtype, device=device)
    x, y = torch.tensor([10, 4], device=device), torch.tensor([6, 6], device=device)
    v, g = value_and_grad(ops.soft_dtw, D, x, y)
    rv, _ = value_and_grad(reference.soft_dtw, D.double(), x, y)
    assert v.dtype == torch.float32 and g.dtype == dtype
    assert rel_err(v, rv) < 1e-5


def test_gradcheck(device):
    D = cost_matrix(3, 6, 5, device=device).requires_grad_()
    x, y = torch.tensor([6, 2, 4], device=device), torch.tensor([5, 5, 1], device=device)
    assert torch.autograd.gradcheck(lambda d: ops.soft_dtw(d, x, y, gamma=0.5), (D,))
    assert torch.autograd.gradcheck(lambda d: ops.soft_dtw(d, x, x.clamp(max=5), bandwidth=1), (D,))


def test_opcheck(device):
    D = cost_matrix(3, 7, 5, device=device).requires_grad_()
    x, y = torch.tensor([7, 3, 1], device=device), torch.tensor([5, 2, 4], device=device)
    torch.library.opcheck(torch.ops.lyra.soft_dtw_forward.default, (D, x, y, 0.1, -1, True))
    torch.library.opcheck(
        torch.ops.lyra.soft_dtw_forward.default, (D.detach(), x, torch.tensor([5, 2, 1], device=device), 0.3, 2, False)
    )
    torch.library.opcheck(torch.ops.lyra.soft_dtw_alignment.default, (D, x, y, 0.1, -1))
    E = torch.rand(3, 7, 5, dtype=torch.float64, device=device)
    torch.library.opcheck(torch.ops.lyra.soft_dtw_alignment_backward.default,
                          (torch.randn(3, dtype=torch.float64, device=device), E))


@pytest.mark.parametrize("B,threads", [(16, 2), (16, 1), (2, 3), (1, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_alignment_equals_forward_then_backward(B, threads, dtype):
    """soft_dtw_alignment (what ops.soft_dtw runs when a gradient is wanted) is the forward and
    the backward of ones in one call: bitwise the same value and E as the two ops, whole samples
    (each sample's passes back to back through cached weights) or stripes (B < threads), with
    and without a band, variable lengths, NaN and all; and autograd's gradient is grad[b] * E."""
    before = torch.get_num_threads()
    D = cost_matrix(B, 120, 70, dtype=dtype, seed=B + threads)
    x, y = random_lengths(B, 120, 70, seed=B)
    x[0], y[0] = 120, 70  # a full-size sample: the padding of the others is zero in E
    if B > 1:
        D[1, 3, 4] = float("nan")  # inside sample 1's cells: its value and E are NaN
        x[1], y[1] = max(int(x[1]), 10), max(int(y[1]), 10)
    try:
        torch.set_num_threads(threads)
        for bandwidth in (-1, 60):
            if bandwidth >= 0:  # the end cells inside the band
                x = torch.maximum(x, y - bandwidth)
                y = torch.maximum(y, x - bandwidth)
            v, w = torch.ops.lyra.soft_dtw_forward(D, x, y, 0.2, bandwidth, True)
            E_ref = torch.ops.lyra.soft_dtw_backward(torch.ones(B, dtype=dtype), w, x, y, bandwidth)
            va, E = torch.ops.lyra.soft_dtw_alignment(D, x, y, 0.2, bandwidth)
            assert torch.equal(va.isnan(), v.isnan()) and torch.equal(va.nan_to_num(), v.nan_to_num())
            assert torch.equal(E.isnan(), E_ref.isnan()) and torch.equal(E.nan_to_num(), E_ref.nan_to_num())
            if B > 1:
                assert v[1].isnan() and E[1].isnan().any()
            grad = torch.randn(B, dtype=dtype)
            Dg = D.clone().requires_grad_()
            ops.soft_dtw(Dg, x, y, gamma=0.2, bandwidth=None if bandwidth < 0 else bandwidth).backward(grad)
            expected = grad[:, None, None] * E_ref
            assert torch.equal(Dg.grad.isnan(), expected.isnan())
            assert torch.equal(Dg.grad.nan_to_num(), expected.nan_to_num())
    finally:
        torch.set_num_threads(before)


def test_alignment_is_a_probability_of_passing_through_each_cell():
    """E, checked by what it means rather than how it is computed: every alignment path passes
    through (1, 1) and (L, S) and through each row and column at least once, so those corners
    are 1, each row and column of E sums to >= 1, every entry lies in [0, 1], and E is zero
    outside the sample; and a near-hard alignment (tiny gamma) on a cost with one cheap path
    puts E ~ 1 on that path and ~ 0 elsewhere."""
    D = cost_matrix(2, 40, 25, seed=21)
    x, y = torch.tensor([40, 31]), torch.tensor([25, 25])
    _, E = torch.ops.lyra.soft_dtw_alignment(D, x, y, 0.5, -1)
    for b in range(2):
        Eb = E[b, : x[b], : y[b]]
        assert Eb.min() >= 0 and Eb.max() <= 1 + 1e-12
        assert abs(Eb[0, 0] - 1) < 1e-12 and abs(Eb[-1, -1] - 1) < 1e-12
        assert (Eb.sum(1) >= 1 - 1e-9).all() and (Eb.sum(0) >= 1 - 1e-9).all()
        assert E[b, x[b]:].abs().sum() == 0 and E[b, :, y[b]:].abs().sum() == 0
    # One cheap monotone path (the "diagonal" of a 40 x 25 grid): a hard alignment follows it.
    cheap = torch.full((1, 40, 25), 5.0, dtype=torch.float64)
    rows = torch.arange(40)
    cols = (rows * 24) // 39
    cheap[0, rows, cols] = 0.0
    _, E = torch.ops.lyra.soft_dtw_alignment(cheap, torch.tensor([40]), torch.tensor([25]), 0.01, -1)
    on_path = torch.zeros(40, 25, dtype=torch.bool)
    on_path[rows, cols] = True
    assert (E[0][on_path] > 0.999).all() and (E[0][~on_path] < 1e-3).all()


@pytest.mark.parametrize("threads", [1, 2])
def test_denormals_are_flushed_inside_and_kept_outside(threads):
    """The CPU recursions flush denormals while they run (x86 runs every operation on one in
    microcode, ~100x slower, and E far from the optimal path falls below float's normal range),
    and leave every thread's floating-point mode as they found it: afterwards torch multiplies
    denormals as before, on the calling thread and on its OpenMP workers."""
    import platform

    before = torch.get_num_threads()
    tiny = torch.full((1 << 17,), 1e-40)  # a float32 denormal; torch's multiply splits it over threads
    try:
        torch.set_num_threads(threads)
        D = cost_matrix(8, 120, 60, dtype=torch.float32, seed=7).requires_grad_()
        x, y = torch.full((8,), 120), torch.full((8,), 60)
        for _ in range(3):  # the threads' later runs too
            _, E = torch.ops.lyra.soft_dtw_alignment(D.detach(), x, y, 0.1, -1)
            _, w = torch.ops.lyra.soft_dtw_forward(D.detach(), x, y, 0.1, -1, True)
            dD = torch.ops.lyra.soft_dtw_backward(torch.ones(8), w, x, y, -1)
            assert (tiny * 2 > tiny).all()  # with FTZ or DAZ left on: 0 > 0, or 0 > tiny
        if platform.machine() in ("x86_64", "AMD64"):
            _, E64 = torch.ops.lyra.soft_dtw_alignment(D.detach().double(), x, y, 0.1, -1)
            for t in (E, dD, w, E64):  # zero or normal: nothing went through the slow range
                normal = torch.finfo(t.dtype).tiny
                assert ((t == 0) | (t.abs() >= normal)).all()
            assert (E64 == 0).any()  # there were cells that small, flushed
    finally:
        torch.set_num_threads(before)

@pytest.mark.parametrize("normalize", ["length_sum", "x_length", "none"])
def test_lcmr_matches_per_sample_reference(device, normalize):
    g = torch.Generator().manual_seed(5)
    B, L, S, d = 4, 25, 9, 16
    speech = torch.randn(B, L, d, generator=g, dtype=torch.float64).to(device).requires_grad_()
    text = torch.randn(B, S, d, generator=g, dtype=torch.float64).to(device).requires_grad_()
    sl, tl = torch.tensor([25, 3, 12, 1], device=device), torch.tensor([9, 9, 1, 4], device=device)
    out = ops.lcmr_loss(speech, text, sl, tl, normalize=normalize)
    ref = reference.lcmr_loss(speech, text, sl, tl, normalize=normalize)
    assert rel_err(out, ref) < 1e-6
    w = torch.arange(1.0, B + 1, dtype=torch.float64, device=device)
    ga = torch.autograd.grad((out * w).sum(), (speech, text))
    gb = torch.autograd.grad((ref * w).sum(), (speech, text))
    for a, b in zip(ga, gb):
        assert rel_err(a, b) < 1e-6
    # Padding gets no gradient at all.
    assert not ga[0][1, 3:].any() and not ga[1][2, 1:].any()


def test_lcmr_gradcheck():
    g = torch.Generator().manual_seed(1)
    speech = torch.randn(2, 5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    text = torch.randn(2, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    sl, tl = torch.tensor([5, 2]), torch.tensor([3, 2])
    assert torch.autograd.gradcheck(
        lambda s, t: ops.lcmr_loss(s, t, sl, tl, temperature=0.5), (speech, text)
    )


def test_torch_compile_fullgraph():
    speech = torch.randn(3, 12, 8, requires_grad=True)
    text = torch.randn(3, 5, 8, requires_grad=True)
    sl, tl = torch.tensor([12, 6, 1]), torch.tensor([5, 2, 3])

    def step(s, t):
        return ops.lcmr_loss(s, t, sl, tl).mean()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(speech, text)
    loss.backward()
    grads = (speech.grad.clone(), text.grad.clone())
    speech.grad = text.grad = None
    eager = step(speech, text)
    eager.backward()
    torch.testing.assert_close(loss, eager)
    torch.testing.assert_close(grads[0], speech.grad)
    torch.testing.assert_close(grads[1], text.grad)


# ----------------------------------------------------------------------------- bad input
def test_errors_name_the_problem():
    D = torch.rand(2, 4, 3)
    x, y = torch.tensor([4, 2]), torch.tensor([3, 3])
    with pytest.raises(ValueError, match=r"x_lengths\[1\] = 5 is out of range"):
        ops.soft_dtw(D, torch.tensor([4, 5]), y)
    with pytest.raises(ValueError, match=r"y_lengths\[0\] = 0 is out of range"):
        ops.soft_dtw(D, x, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"x_lengths must have shape \(B,\)"):
        ops.soft_dtw(D, torch.tensor([4, 2, 1]), y)
    with pytest.raises(TypeError, match="x_lengths must be an integer tensor"):
        ops.soft_dtw(D, x.float(), y)
    with pytest.raises(TypeError, match="D must be a floating-point tensor"):
        ops.soft_dtw(D.long(), x, y)
    with pytest.raises(ValueError, match=r"D must have shape \(B, Lmax, Smax\)"):
        ops.soft_dtw(D[0], x, y)
    with pytest.raises(ValueError, match="gamma must be a finite number > 0"):
        ops.soft_dtw(D, x, y, gamma=0.0)
    with pytest.raises(ValueError, match="gamma must be a finite number > 0"):
        ops.soft_dtw(D, x, y, gamma=float("inf"))
    with pytest.raises(ValueError, match="gamma must be a finite number > 0"):
        torch.ops.lyra.soft_dtw_forward(D, x, y, float("inf"), -1, False)
    with pytest.raises(ValueError, match="bandwidth must be None or an int"):
        ops.soft_dtw(D, x, y, bandwidth=True)
    with pytest.raises(TypeError, match="speech_lengths must be a torch.Tensor"):
        ops.lcmr_loss(torch.rand(2, 4, 3), torch.rand(2, 3, 3), [4, 2], y)
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        ops.lcmr_loss(torch.rand(2, 4, 3), torch.rand(2, 3, 3), x, y, temperature=0.0)
    with pytest.raises(ValueError, match="exceeds bandwidth 0"):
        ops.soft_dtw(D, x, y, bandwidth=0)
    with pytest.raises(ValueError, match="bandwidth must be None or an int"):
        ops.soft_dtw(D, x, y, bandwidth=-2)
    with pytest.raises(ValueError, match="non-empty"):
        torch.ops.lyra.soft_dtw_forward(torch.rand(2, 0, 3), x, y, 0.1, -1, False)
    with pytest.raises(ValueError, match="normalize must be"):
        ops.lcmr_loss(torch.rand(2, 4, 3), torch.rand(2, 3, 3), x, y, normalize="mean")
    with pytest.raises(ValueError, match="must agree in batch size and hidden size"):
        ops.lcmr_loss(torch.rand(2, 4, 3), torch.rand(2, 3, 5), x, y)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_mixed_devices_rejected():
    D = torch.rand(2, 4, 3, device="cuda")
    with pytest.raises(ValueError, match="x_lengths is on cpu but D is on cuda"):
        ops.soft_dtw(D, torch.tensor([4, 2]), torch.tensor([3, 3], device="cuda"))


@pytest.mark.skipif(not (torch.cuda.is_available() and _extension.HAS_CUDA_OPS),
                    reason="needs a GPU and the CUDA extension")
def test_cuda_edge_batch_on_a_side_stream_after_a_long_producer():
    """The edge batch (1 x 1, 1 x S, L x 1, S > L, |L - S| = band, band 0, lengths below
    Lmax / Smax) in float64 against the CPU op, plus gradcheck, run on a non-default stream
    right after a long-running kernel that produces D there: a launch on another stream would
    read D before it is written (.ci/gpu a, issue 16 (iii))."""
    lengths = [(1, 1), (1, 9), (9, 1), (5, 9), (9, 9), (7, 4), (3, 3)]
    B, Lmax, Smax = len(lengths), 9, 9
    x = torch.tensor([a for a, _ in lengths])
    y = torch.tensor([b for _, b in lengths])
    want_cpu = cost_matrix(B, Lmax, Smax, seed=11)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        slow = torch.randn(4096, 4096, device="cuda", dtype=torch.float64)
        for _ in range(8):  # tens of milliseconds of work queued ahead of D
            slow = torch.tanh(slow @ slow.T / 4096)
        D = want_cpu.cuda() + 0.0 * slow[:B * Lmax * Smax].view(B, Lmax, Smax)
        for bandwidth in (None, 5, 0):
            xb, yb = x, y
            if bandwidth is not None:  # lengths the band can join: |L - S| <= band
                yb = torch.minimum(torch.maximum(y, x - bandwidth), x + bandwidth).clamp(min=1)
            got = value_and_grad(ops.soft_dtw, D, xb.cuda(), yb.cuda(), bandwidth=bandwidth)
            want = value_and_grad(ops.soft_dtw, want_cpu, xb, yb, bandwidth=bandwidth)
            torch.cuda.current_stream().synchronize()
            assert rel_err(got[0].cpu(), want[0]) < 1e-12 and rel_err(got[1].cpu(), want[1]) < 1e-10
        D = D.detach().requires_grad_()
        assert torch.autograd.gradcheck(
            lambda d: ops.soft_dtw(d, x.cuda(), y.cuda(), gamma=0.5), (D,), eps=1e-6, atol=1e-6)


def _cuda_free_bytes() -> float:
    return torch.cuda.mem_get_info()[0] if torch.cuda.is_available() else 0.0


@pytest.mark.skipif(not (torch.cuda.is_available() and _extension.HAS_CUDA_OPS),
                    reason="needs a GPU and the CUDA extension")
def test_cuda_long_batch_past_2_31_elements():
    """.ci/gpu a (ii): B=32, L=20,000, S=4,000 in float32, forward and backward (2.56e9
    elements: int64 offsets), with lengths below Lmax / Smax: no fault, the gradient exactly zero
    outside each sample's cells, and each sample equal to itself run alone."""
    if _cuda_free_bytes() < 60e9:
        pytest.skip(f"needs 60 GB of free device memory, {_cuda_free_bytes() / 1e9:.1f} GB free")
    B, L, S = 32, 20_000, 4_000
    g = torch.Generator(device="cuda").manual_seed(5)
    D = torch.rand(B, L, S, device="cuda", generator=g) * 4
    x = torch.tensor([L - 37 * b for b in range(B)], device="cuda")
    y = torch.tensor([S - 11 * b for b in range(B)], device="cuda")
    v, grad = value_and_grad(ops.soft_dtw, D, x, y)
    torch.cuda.synchronize()
    rows = torch.arange(L, device="cuda")[None, :, None] < x[:, None, None]
    cols = torch.arange(S, device="cuda")[None, None, :] < y[:, None, None]
    assert grad.masked_select(~(rows & cols)).eq(0).all()  # exact zeros outside
    del rows, cols
    w = torch.linspace(0.5, 1.5, B, dtype=v.dtype, device="cuda")  # value_and_grad's weights
    for b in range(B):
        lb, sb = int(x[b]), int(y[b])
        vb, gb = value_and_grad(ops.soft_dtw, D[b:b + 1, :lb, :sb].contiguous(), x[b:b + 1],
                                y[b:b + 1])
        assert torch.equal(vb[0], v[b]), b
        torch.testing.assert_close(gb[0] * w[b] / 0.5, grad[b, :lb, :sb], rtol=1e-6, atol=0)


@pytest.mark.skipif(not (torch.cuda.is_available() and _extension.HAS_CUDA_OPS),
                    reason="needs a GPU and the CUDA extension")
@pytest.mark.parametrize("bandwidth", [None, 300])
def test_cuda_global_scratch_by_size_equals_forced_and_cpu(bandwidth, monkeypatch):
    """.ci/gpu a (ii): B=2, L=S=12,000, whose three live diagonals (288 KB of doubles) exceed any
    GPU's shared memory per block: the global-scratch path reached by size equals the one forced
    by LYRA_SOFT_DTW_GLOBAL_SCRATCH bit for bit, and the CPU op."""
    n = 12_000
    D = torch.rand(2, n, n, generator=torch.Generator().manual_seed(9)) * 4
    x, y = torch.tensor([n, n - 150]), torch.tensor([n - 100, n])
    by_size = value_and_grad(ops.soft_dtw, D.cuda(), x.cuda(), y.cuda(), bandwidth=bandwidth)
    monkeypatch.setenv("LYRA_SOFT_DTW_GLOBAL_SCRATCH", "1")
    forced = value_and_grad(ops.soft_dtw, D.cuda(), x.cuda(), y.cuda(), bandwidth=bandwidth)
    assert torch.equal(by_size[0], forced[0]) and torch.equal(by_size[1], forced[1])
    cpu = value_and_grad(ops.soft_dtw, D, x, y, bandwidth=bandwidth)
    assert rel_err(by_size[0].cpu(), cpu[0]) < 1e-5 and rel_err(by_size[1].cpu(), cpu[1]) < 1e-4
