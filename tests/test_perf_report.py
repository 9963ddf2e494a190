"""benchmarks/perf_report.py's issue-21 rows from raw script outputs (no GPU: the rows are computed from the
JSON the scripts write). Figures below are session 10's H100 measurements (results/session10)."""
import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _perf_report():
    spec = importlib.util.spec_from_file_location("perf_report", os.path.join(ROOT, "benchmarks", "perf_report.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _map_row(ours_cache, ref_cache, same=True):
    return {"case": "map N=1M", "voxels": 1_000_000, "ours_map_ms": 0.848, "ours_cache_ms": ours_cache,
            "ours_conv_cold_minus_warm_ms": 0.951, "ref_map_ms": 0.381, "ref_cache_ms": ref_cache,
            "ref_conv_cold_minus_warm_ms": 0.548, "same_map": same}


def _decoder_row(ours, ref, same=True):
    return {"case": "decoder 1024", "tokens": 20336, "ours_ms": ours, "ours_peak_gib": 2.96, "ref_ms": ref,
            "ref_peak_gib": 4.43, "ratio": round(ours / ref, 3), "same_coords": same}


def test_reference_rows_hold_where_ours_is_faster_in_the_same_run():
    pr = _perf_report()
    raw = {"reference": {"rows": [_map_row(1.049, 0.549), _decoder_row(167.53, 234.49)]}}
    rows = pr.summarise_reference(raw)
    assert [r["ok"] for r in rows] == [False, True]  # map 1.049 > 0.549 ms; decoder 167.53 / 234.49 = 0.714 <= 0.85
    assert "0.71x" in rows[1]["ours"] and "FlexGEMM 0.549 ms" in rows[0]["baseline"]


def test_reference_rows_fail_on_a_slow_decoder_or_a_different_map():
    pr = _perf_report()
    raw = {"reference": {"rows": [_map_row(0.5, 0.549, same=False), _decoder_row(200.0, 234.49)]}}
    assert [r["ok"] for r in pr.summarise_reference(raw)] == [False, False]  # maps differ; 200 / 234.49 = 0.853
    assert pr.summarise_reference({}) == []  # not run: no rows


def test_first_call_rows_take_the_early_start_when_it_ran():
    pr = _perf_report()
    log = lambda ss, dec: {"log": {"ss_first_ms": ss, "decoder_first_ms": dec}}  # noqa: E731
    raw = {"first_pipeline_early_warm": log(747.7, 309.3), "first_pipeline_load_warm": log(1205.8, 312.1),
           "first_pipeline_before_warm": log(1014.7, 672.0), "first_pipeline_early_cold": log(1850.2, 1278.0),
           "first_pipeline_before_cold": log(3149.8, 2963.9)}
    warm, cold = pr.summarise_first_calls(raw)
    assert warm["ok"] and cold["ok"]  # 0.75 / 0.31 s < 1 s; 1.85 / 1.28 s < 2 s
    assert "Triton start" in warm["ours"] and "1.21 s" in warm["baseline"]
    del raw["first_pipeline_early_warm"]
    warm = pr.summarise_first_calls(raw)[0]
    assert not warm["ok"] and "Triton start" not in warm["ours"]  # the load-only run: 1.21 s >= 1 s


def test_child_map_row_needs_the_derived_map_no_slower_and_identical():
    pr = _perf_report()
    row = {"case": "child map", "voxels": 4_900_000, "parents": 1_250_000, "triton_ms": 0.9, "torch_ms": 2.1,
           "equal": True, "anchor": "in run"}
    ok = lambda r: [x["ok"] for x in pr.summarise_kernels({"maps": {"rows": [r]}}) if "children" in x["figure"]]  # noqa: E731
    assert ok(row) == [True]  # 0.9 <= 2.1 ms, same map
    assert ok(dict(row, triton_ms=2.2)) == [False] and ok(dict(row, equal=False)) == [False]


def test_new_object_rows_take_the_pipeline_as_it_runs_with_the_synced_baseline():
    """Issue 21's new-object rows read the row that ran the pipeline as it is (not the per-step sync
    baseline, which bench_geometry writes first), with the same object again and the synced row beside it.
    Figures: session 11's H100 (512: 2.139 s new, 1.977 s again; cascade 3.383 s) and invented synced rows."""
    pr = _perf_report()
    rows = [{"pipeline_type": "512", "offload": False, "host_sync_each_step": True, "total_s": 2.139},
            {"pipeline_type": "512", "offload": False, "host_sync_each_step": False, "total_s": 1.99,
             "same_object_again": {"total_s": 1.977}, "flash_first_step": True, "plan_attention_ahead": False},
            {"pipeline_type": "1024_cascade", "offload": False, "total_s": 3.383}]  # an older file: no sync key
    new512, cascade = pr.summarise_new_objects({"geometry": {"rows": rows}})
    assert new512["ok"] and "1.99 s" in new512["ours"]  # 1.99 <= 2.0, not the synced 2.139
    assert "1.98 s the same object again" in new512["baseline"] and "2.14 s with a device sync" in new512["baseline"]
    assert cascade["ok"] and cascade["baseline"] == "-"  # 3.383 <= 3.5
    rows[1]["total_s"] = 2.01
    assert not pr.summarise_new_objects({"geometry": {"rows": rows}})[0]["ok"]
    assert pr.summarise_new_objects({}) == []
