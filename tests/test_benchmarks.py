"""The benchmark harness runs end to end (a smoke run: tiny shapes, no timing claims)."""

import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).parent.parent


def test_smoke_run_writes_json_and_a_table(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--smoke", "--only", "plain", "causal",
                    "sigmoid", "block_sparse", "decode", "--repeats", "1", "--proxies", "--out", str(tmp_path)], check=True, capture_output=True,
                   text=True)
    [folder] = tmp_path.iterdir()
    rows = json.loads((folder / "results.json").read_text())["rows"]
    ours = [r for r in rows if r["impl"] == "attngen"]
    assert {r["variant"] for r in ours} == {"plain", "causal", "sigmoid", "block_sparse"}
    assert all("forward_ms" in r for r in ours)
    sigmoid = next(r for r in ours if r["variant"] == "sigmoid")
    plain = next(r for r in ours if r["variant"] == "plain")
    assert sigmoid["forward_ms_vs_own_softmax"] == plain["forward_ms"] / sigmoid["forward_ms"]
    sdpa = next(r for r in rows if r["impl"] == "sdpa")
    assert sdpa["max_diff_vs_attngen"] < 1e-4  # implementations agree before they are timed
    table = (folder / "results.md").read_text()
    assert "| causal | attngen |" in table and "torch " in table and "triton " in table
    decode = json.loads((folder / "results.json").read_text())["decode"]
    assert {r["impl"] for r in decode} >= {"attngen", "sdpa", "attngen differential", "attngen stick-breaking",
                                            "attngen 1/4 of the key blocks"}
    assert all(r.get("max_diff_vs_attngen", 1) < 1e-4 for r in decode if r["impl"] == "sdpa")
    assert all("forward_ms" in r for r in decode if r["impl"].startswith("attngen"))
    assert {r["impl"] for r in decode if r["head_dim"] == "576/512"} >= {"attngen", "sdpa"}  # MLA, absorbed
    assert "## Decoding" in table
    proxies = json.loads((folder / "proxies.json").read_text())
    causal = next(r for r in proxies["tiles"] if r["mask"] == "causal")
    assert causal["visited"] < 0.6 and "## CPU proxies" in table
    assert proxies["plan"]["summaries_ms"] < proxies["plan"]["dense_torch_ms"]
    host = {r["call"]: r for r in proxies["host"]}
    assert len(host) == 8 and all(0 < r["microseconds"] < 1e5 and r["torch_ops"] >= 2 for r in host.values())
    assert host["document mask, forward + backward"]["torch_ops"] > host["document mask, forward"]["torch_ops"]
    passes = {(r["normalization"], r["score_std"]): r["passes"] for r in proxies["threshold"]}
    assert len(passes) == 4 and all(1 <= n <= 8 for n in passes.values()) and "Newton passes" in table


def test_head_dims_that_differ(tmp_path):
    """--dims DQK/DV (MLA's training form is 192/128): inputs of each, the implementations agree, FLOPs count
    QK^T and PV at their own dims."""
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--smoke", "--only", "causal", "--dims",
                    "40/24", "--repeats", "1", "--out", str(tmp_path)], check=True, capture_output=True, text=True)
    [folder] = tmp_path.iterdir()
    rows = json.loads((folder / "results.json").read_text())["rows"]
    assert {r["head_dim"] for r in rows} == {"40/24"} and {"attngen", "sdpa"} <= {r["impl"] for r in rows}
    assert all(r["max_diff_vs_attngen"] < 1e-4 for r in rows if r["impl"] == "sdpa")
    ours = next(r for r in rows if r["impl"] == "attngen")
    flops = 2 * 1 * 2 * 64 * 64 * (40 + 24) * (0.5 + 0.5 / 64)
    assert abs(ours["forward_tflops"] - flops / ours["forward_ms"] / 1e9) < 1e-9 * ours["forward_tflops"]


def test_budget_stops_new_measurements_and_still_writes(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--smoke", "--budget", "0",
                           "--out", str(tmp_path)], check=True, capture_output=True, text=True)
    assert "budget of 0 s spent" in done.stdout
    [folder] = tmp_path.iterdir()
    results = json.loads((folder / "results.json").read_text())
    assert results["rows"] == [] and results["decode"] == [] and results["meta"]["stopped_at_budget"]
    assert "stopped after the 0 s budget" in (folder / "results.md").read_text()


def test_machine_code_report_flags_synchronous_mma(tmp_path):
    """With 32-row tiles (under the 64 rows of a warpgroup) Hopper's wgmma cannot be used: the report
    must say so, and stay clean with 64."""
    script = str(ROOT / "benchmarks" / "machine_code.py")
    for rows, flagged in ((64, False), (32, True)):
        subprocess.run([sys.executable, script, "--only", "causal", "--dims", "64", "--tiles",
                        json.dumps({"BLOCK_M": rows, "BLOCK_N": 32}), "--out", str(tmp_path)], check=True,
                       capture_output=True, text=True)
        kernels = {r["name"]: r for r in json.loads((tmp_path / "machine_code.json").read_text())}
        assert set(kernels) == {"_attn_fwd", "_attn_bwd_preprocess", "_attn_bwd_dkdv", "_attn_bwd_dq"}
        assert all(r["registers"] > 0 for r in kernels.values())
        dots = [kernels[name] for name in ("_attn_fwd", "_attn_bwd_dkdv", "_attn_bwd_dq")]
        assert all((r["mma_sync"] > 0) == flagged and (r["wgmma"] > 0) != flagged for r in dots)
        assert ("| **_attn_bwd_dkdv** |" in (tmp_path / "machine_code.md").read_text()) == flagged
