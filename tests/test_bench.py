"""The benchmark command runs end to end (smallest sizes) and writes its files."""
import csv

from lyra_pl.bench.__main__ import main


def test_bench_kernels_quick(tmp_path):
    rc = main(["kernels", "--quick", "--device", "cpu", "--repeats", "1", "--warmup", "0",
               "--out", str(tmp_path)])
    assert rc == 0
    written = {p.suffix for p in tmp_path.iterdir()}
    assert {".csv", ".json"} <= written
    rows = list(csv.DictReader(next(tmp_path.glob("*.csv")).open()))
    ours = [r for r in rows if r["impl"] == "ours"]
    assert {r["op"] for r in ours} == {"softdtw", "prune"}
    assert all(float(r["median_ms"]) > 0 for r in ours)


def test_bench_prefill_tiny_cpu(tmp_path):
    """Every setting at two lengths; LMME keeps fewer tokens than the baseline, and the
    stricter ratio fewer than the looser one; CSV, JSON and plot written."""
    rc = main(["prefill", "--device", "cpu", "--lengths", "256", "512", "--decode-tokens", "4",
               "--repeats", "1", "--out", str(tmp_path)])
    assert rc == 0
    assert {p.suffix for p in tmp_path.iterdir()} == {".csv", ".json", ".png"}
    rows = list(csv.DictReader(next(tmp_path.glob("*.csv")).open()))
    assert [(r["setting"], r["tokens"]) for r in rows] == [
        (s, n) for s in ("baseline", "LMME(4,0.8)", "LMME(4,0.7)") for n in ("256", "512")]
    kept = {(r["setting"], int(r["tokens"])): int(r["kept_after_last_block"]) for r in rows}
    for n in (256, 512):
        assert kept[("baseline", n)] == n
        assert kept[("LMME(4,0.7)", n)] < kept[("LMME(4,0.8)", n)] < n
    assert all(float(r["prefill_s"]) > 0 and float(r["decode_tok_s"]) > 0 for r in rows)
