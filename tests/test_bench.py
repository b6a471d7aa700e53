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
