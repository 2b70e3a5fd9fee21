"""Smoke runs of the benchmark scripts at tiny sizes, so that they do not rot between measurements.

Each script runs as a user runs it (a subprocess from the repository root) and
must print its comparison table with figures that agree with each other. No
assertion here depends on a timing: a ratio of two printed times is checked to
lie within what the rounding of those times allows (`assert_ratio_of_rounded`),
and a decision printed from unrounded figures is checked against the printed
ratio only where the rounding cannot flip it. Speed targets live in the
benchmarks themselves (docs/benchmarks.md).
"""
from __future__ import annotations

import re
import subprocess
import sys

import pytest
from benchmark_runs import ROOT, run_benchmark, table_rows


def ratio(cell: str) -> float:
    match = re.fullmatch(r"(\d+\.\d+)x", cell)
    assert match, f"not a ratio: {cell!r}"
    return float(match.group(1))


def _half_unit(text: str) -> float:
    """Half the last printed digit of a number printed as ``text`` (its rounding error at most)."""
    decimals = len(text.split(".")[1]) if "." in text else 0
    return 0.5 * 10.0 ** -decimals


def assert_ratio_of_rounded(printed: str, numerator: str, denominator: str) -> None:
    """``printed`` (a ratio, e.g. ``"1.71"``) is numerator / denominator for some unrounded values that print
    as ``numerator`` and ``denominator``: the check cannot fail for a timing, only for a wrong ratio."""
    r, hr = float(printed), _half_unit(printed)
    n, hn = float(numerator), _half_unit(numerator)
    d, hd = float(denominator), _half_unit(denominator)
    low = (n - hn) / (d + hd)
    high = (n + hn) / (d - hd) if d - hd > 0 else float("inf")
    assert low - hr <= r <= high + hr, f"{printed} is not {numerator} / {denominator}"


def test_the_rounding_check_tells_a_right_ratio_from_a_wrong_one():
    assert_ratio_of_rounded("1.71", "0.98", "0.57")  # e.g. 0.9795 / 0.5728
    assert_ratio_of_rounded("3.40", "0.3", "0.1")  # e.g. 0.34 / 0.1, though 0.3 / 0.1 is 3
    with pytest.raises(AssertionError):
        assert_ratio_of_rounded("1.50", "0.98", "0.57")
    with pytest.raises(AssertionError):
        assert_ratio_of_rounded("0.58", "0.98", "0.57")  # the inverse


@pytest.mark.slow
def test_bench_model_prints_both_models_and_their_ratio():
    out = run_benchmark(
        "bench_model.py", "--size", "32", "--batch", "2", "--steps", "1", "--rounds", "1", "--warmup", "0",
        "--threads", "1", "--only", "fp32,unfused",
    )
    assert "forward multiply-adds per image" in out
    for name in ("fp32", "unfused"):
        [row] = table_rows(out, name)
        tv_train, topo_train, train_ratio, tv_infer, topo_infer, infer_ratio = row[1:7]
        assert float(tv_train) > 0 and float(topo_train) > 0
        assert ratio(train_ratio) > 0 and ratio(infer_ratio) > 0
        assert_ratio_of_rounded(train_ratio.removesuffix("x"), topo_train, tv_train)
        assert_ratio_of_rounded(infer_ratio.removesuffix("x"), topo_infer, tv_infer)


@pytest.mark.slow
def test_bench_stats_reports_the_overhead_ratio():
    out = run_benchmark(
        "bench_stats.py", "--size", "32", "--batch-size", "4", "--batches", "2", "--repeats", "1", "--skip-naive",
        "--bound-channels", "16", "--bound-size", "8", "--bound-batch", "2", "--bound-repeats", "2",
        "--paths-sizes", "5", "16", "--paths-channels", "8", "--paths-batch", "4", "--paths-repeats", "2",
        "--record-repeats", "2",
    )
    # (d): both product paths per map size, their ratio, and the default's choice by the share of pairs inside
    paths = re.findall(r"(\d+) x +(\d+) \| +(\d\.\d+) \| +(\S+) \| +(\S+) \| +(\S+)x \| (\w+)", out)
    assert [p[0] for p in paths] == ["5", "16"], out
    for _, _, share, stacked, cropped, printed, default in paths:
        assert_ratio_of_rounded(printed, stacked, cropped)
        assert default == ("cropped" if float(share) <= 0.7 else "stacked")
    assert [p[6] for p in paths] == ["cropped", "stacked"]  # 0.32 and 0.74 of the pairs inside
    # (a): the statistics' overhead on the forward pass, from the two times it prints
    match = re.search(r"steady state, interleaved: forward (\d+\.\d+) s\s+forward \+ statistics (\d+\.\d+) s\s+"
                      r"ratio (\d+\.\d+)x", out)
    assert match, out
    forward, recording, overhead = match.groups()
    assert float(forward) > 0 and float(recording) > 0
    assert_ratio_of_rounded(overhead, recording, forward)
    assert re.search(r"positions used per image: inception3a \d+", out), out  # the "auto" choices are printed
    assert re.search(r"products [\d,]+ multiply-adds per image \(\d+\.\d+ forward passes\)", out), out
    once = re.search(r"one record\(\) call incl\. allocating the statistics: forward (\d+\.\d+) s\s+record (\d+\.\d+) s"
                     r"\s+ratio (\d+\.\d+)x", out)
    assert once, out
    assert_ratio_of_rounded(once[3], once[2], once[1])
    ratios = [float(r) for r in re.findall(r"one record\(\) call incl\. .*ratio (\d+\.\d+)x", out)]
    median = re.search(r"one record\(\) call over a forward pass, median of 2: (\d+\.\d+)x", out)
    assert len(ratios) == 2 and median, out
    assert abs(float(median[1]) - sum(ratios) / 2) <= 0.011  # the median of two is their mean (each rounded)
    bound = re.search(r"exact update (\S+) s   fused-GEMM bound (\S+) s   ratio (\d+\.\d+)x", out)
    assert bound, out
    update_s, bound_s, printed = bound.groups()
    assert float(update_s) > 0 and float(bound_s) > 0
    assert_ratio_of_rounded(printed, update_s, bound_s)


@pytest.mark.slow
def test_bench_cluster_recovers_a_small_planted_network():
    out = run_benchmark(
        "bench_cluster.py", "--channels", "48", "--samples", "128", "--size", "8", "--window", "3",
        "--threads", "1", "--methods", "arora,agglomerative",
    )
    from topo.planted.generator import PlantedConfig, generate

    # the truth the table prints is the planted network's, generated here independently with the same settings
    truth = generate(PlantedConfig(num_channels=48, num_hidden=12, degree=6, num_samples=128, height=8, width=8,
                                   seed=0)).truth.kernel_counts
    for method in ("arora", "agglomerative"):
        [row] = table_rows(out, method)
        clusters, per_kernel, printed_truth = int(row[3]), row[4], row[5]
        assert clusters > 0 and sum(map(int, per_kernel.split("/"))) == clusters  # kernels 1, 3, 5 only
        assert printed_truth == f"{truth[1]}/{truth[3]}/{truth[5]}"
    assert float(table_rows(out, "arora")[0][6]) > 0.5  # Arora's method recovers planted structure


@pytest.mark.slow
def test_bench_cluster_dense_case_fits_saved_statistics_as_it_fits_fresh_ones(tmp_path):
    stats = tmp_path / "dense.pt"
    args = ("bench_cluster.py", "--case", "dense", "--layer", "inception3a:input", "--batches", "1",
            "--batch-size", "8", "--window", "3", "--threads", "1", "--methods", "arora,agglomerative",
            "--stats", str(stats))
    recorded = run_benchmark(*args)
    assert stats.exists() and "statistics read from" not in recorded
    reread = run_benchmark(*args)
    assert "statistics read from" in reread
    for method in ("arora", "agglomerative"):  # the same clusters, kernels, edges and cuts from the saved numbers
        [first], [second] = table_rows(recorded, method), table_rows(reread, method)
        assert first[3:] == second[3:] and int(first[5]) > 0


@pytest.mark.slow
def test_bench_data_compares_loader_and_model(tmp_path):
    out = run_benchmark(
        "bench_data.py", "--images", "8", "--size", "32", "--batch-size", "2", "--steps", "1",
        "--workers", "0", "1", "--device", "cpu",
    )
    for workers in ("0", "1"):
        [row] = table_rows(out, workers)
        loader, model, loader_over_model, bottleneck = row[1], row[2], ratio(row[3]), row[4]
        assert float(loader) > 0 and float(model) > 0
        assert_ratio_of_rounded(row[3].removesuffix("x"), loader, model)
        # the script decides from the unrounded ratio; the printed one leaves the decision open only at 1.00
        if loader_over_model != 1.0:
            assert bottleneck == ("model" if loader_over_model > 1.0 else "loader")
        else:
            assert bottleneck in ("model", "loader")


def test_gpu_script_is_valid_bash_and_calls_existing_benchmarks():
    script = ROOT / "benchmarks" / "gpu.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    called = re.findall(r"python (benchmarks/\S+\.py)", script.read_text())
    assert len(called) >= 3
    for path in called:
        assert (ROOT / path).is_file(), path


@pytest.mark.slow
def test_bench_imagenet_width_times_each_module_of_a_construction():
    """The ImageNet-width benchmark at a smoke size: one module on 8 small crops; its row adds up."""
    out = run_benchmark("bench_imagenet_width.py", "--per-class", "4", "--modules", "1", "--image-size", "32",
                        "--batch-size", "4")
    rows = re.findall(r"^\| (inception\w+) \| (\d+) \| (\d+)x(\d+) \| (\d+)(?: \(all\))? \| (\d+) \| (\d+\.\d) \| "
                      r"(\d+\.\d) \| (-?\d+\.\d) \| (\d+\.\d) \| (\d+) \|$", out, flags=re.MULTILINE)
    assert [r[0] for r in rows] == ["inception3a"], out
    _, channels, _, _, _, _, stats_s, cluster_s, build_s, step_s, peak = rows[0]
    assert int(channels) == 192 and float(step_s) > 0 and int(peak) > 0  # the stem's output, as in GoogLeNet
    assert abs(float(stats_s) + float(cluster_s) + float(build_s) - float(step_s)) <= 0.2  # the parts add up
    assert re.search(r"1 modules in \d+ s \(exit 0\)", out), out


def test_compare_options_pairs_one_arm_of_two_studies_by_seed(tmp_path):
    """Two studies' study.csv (the columns `topo-build study` writes): the discovered arm of the second against the
    first's, seed by seed, with scipy's paired t-test; other arms and an unknown arm stay out."""
    import pandas as pd
    from scipy import stats

    base = [0.60, 0.61, 0.58, 0.66, 0.62]
    option = [0.63, 0.60, 0.62, 0.69, 0.66]
    for name, top1 in (("a", base), ("b", option)):
        rows = [{"arm": "discovered", "seed": s, "unit": f"discovered-s{s}", "top1": t, "macs": 12.8e6}
                for s, t in enumerate(top1)]
        rows.append({"arm": "reference", "seed": 0, "unit": "reference-s0", "top1": 0.99, "macs": 12.8e6})
        (tmp_path / name).mkdir()
        pd.DataFrame(rows[::-1]).to_csv(tmp_path / name / "study.csv", index=False)  # seed order is not file order
    out = run_benchmark("compare_options.py", f"even={tmp_path / 'a'}", f"other={tmp_path / 'b'}")
    even, other = table_rows(out, "even")[0], table_rows(out, "other")[0]
    assert even[1] == "5" and float(even[2]) == pytest.approx(61.4, abs=0.05)
    assert other[5] == "5" and float(other[6]) == pytest.approx(2.6, abs=0.005)
    assert float(other[8]) == pytest.approx(stats.ttest_rel(option, base).pvalue, abs=5e-4)
    arm = run_benchmark("compare_options.py", f"googlenet={tmp_path / 'a'}:reference", f"other={tmp_path / 'b'}")
    row = table_rows(arm, "googlenet")[0]
    assert row[1] == "1" and float(row[2]) == 99.0  # DIR:ARM takes that arm of the study
    command = [sys.executable, "benchmarks/compare_options.py", f"x={tmp_path / 'a'}", f"y={tmp_path / 'b'}",
               "--arm", "uniform"]
    bad = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    assert bad.returncode == 2 and "no unit of the arm 'uniform'" in bad.stderr and "Traceback" not in bad.stderr
