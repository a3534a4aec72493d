"""Autotuning: tuned once per shape bucket, stored on disk, pruned by shared memory."""

import json
import multiprocessing
import os
import subprocess
import sys
import textwrap
import types

import torch

from attngen.runtime import autotune

SCRIPT = textwrap.dedent("""
    import sys, torch, attngen as ag
    slopes = torch.rand(2)
    attn = ag.compile(ag.AttentionSpec(score_mod=lambda s, b, h, q_idx, kv_idx: s - slopes[h] * (q_idx - kv_idx),
                                       mask_mod=ag.masks.causal))
    for length in map(int, sys.argv[1:]):
        q, k, v = (torch.randn(1, 2, length, 16, requires_grad=True) for _ in range(3))
        expected = ag.reference.attention(q.double(), k.double(), v.double(), attn.spec)
        out = attn(q, k, v)
        out.sum().backward()
        assert (out.double() - expected).abs().max() < 1e-5
""")


def run(cache_dir, *lengths, quiet=False):
    env = {**os.environ, "ATTNGEN_CACHE_DIR": str(cache_dir), "ATTNGEN_AUTOTUNE": "cpu",
           "ATTNGEN_QUIET": "1" if quiet else "0"}
    result = subprocess.run([sys.executable, "-c", SCRIPT, *map(str, lengths)], env=env, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    return [line for line in result.stderr.splitlines() if line.startswith("attngen:")]


def test_a_bucket_is_tuned_once_and_remembered_across_processes(tmp_path):
    first = run(tmp_path, 40, 50)  # 40 and 50 share the bucket of 64
    assert sum("tuned cpu/float32/16/16/64/64 forward" in line for line in first) == 1
    assert sum("tuned cpu/float32/16/16/64/64 backward" in line for line in first) == 1
    assert sum("[1/2]" in line for line in first) == 2
    [tuning] = tmp_path.glob("*.tuning.json")
    stored = json.loads(tuning.read_text())
    assert list(stored) == ["cpu/float32/16/16/64/64"]
    assert all(stored["cpu/float32/16/16/64/64"][phase] in autotune.CPU_CANDIDATES for phase in ("forward", "backward"))
    assert run(tmp_path, 60) == []  # a new process, same bucket: no tuning
    assert any("tuned cpu/float32/16/16/128/128 backward" in line for line in run(tmp_path, 100))
    assert len(json.loads(tuning.read_text())) == 2


INFERENCE_THEN_TRAINING = textwrap.dedent("""
    import torch, attngen as ag
    attn = ag.compile(ag.AttentionSpec(mask_mod=ag.masks.causal))
    q, k, v = (torch.randn(1, 1, 24, 16, requires_grad=True) for _ in range(3))
    with torch.no_grad():
        attn(q, k, v)
    print("inference done", file=__import__("sys").stderr, flush=True)
    attn(q, k, v).sum().backward()
""")


def test_backward_is_tuned_only_when_gradients_are_needed(tmp_path):
    env = {**os.environ, "ATTNGEN_CACHE_DIR": str(tmp_path), "ATTNGEN_AUTOTUNE": "cpu", "ATTNGEN_QUIET": "0"}
    result = subprocess.run([sys.executable, "-c", INFERENCE_THEN_TRAINING], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    before, after = result.stderr.split("inference done")
    assert "tuned cpu/float32/16/16/32/32 forward" in before and "backward" not in before
    assert "tuned cpu/float32/16/16/32/32 backward" in after and "forward" not in after


def test_quiet_mode_prints_nothing(tmp_path):
    assert run(tmp_path, 20, quiet=True) == []


def test_configs_are_pruned_by_shared_memory():
    h100 = 227 * 1024
    for phase, itemsize in (("forward", 4), ("backward", 2)):
        kept = autotune.fitting(autotune.GPU_CANDIDATES, h100, 128, 128, itemsize, phase)
        assert kept and len(kept) < len(autotune.GPU_CANDIDATES)
        assert all(autotune.shared_memory_bytes(c, 128, 128, itemsize, phase) <= h100 for c in kept)
        assert {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 3} not in kept
        assert len(autotune.fitting(autotune.GPU_CANDIDATES, h100, 64, 64, itemsize, phase)) > len(kept)


def test_wide_head_dims_tune_over_small_tiles():
    """At MLA's 576 / 512 (q and k in parts of 512 + 64) one usual backward candidate fits an H100 (64 x 32,
    one stage: 204 KB, built 204 KB; with 1024-wide q and k tiles none did); the wide ones fit, the 16 x 16
    default among them, the forward up to 64 x 32 with two stages (208 KB) and the backward with one."""
    h100 = 227 * 1024
    fits = autotune.fitting(autotune.GPU_CANDIDATES, h100, 576, 512, 2, "backward")
    assert {(c["BLOCK_M"], c["BLOCK_N"], c["num_stages"]) for c in fits} == {(64, 32, 1)}
    sizes = {phase: {(c["BLOCK_M"], c["BLOCK_N"], c["num_stages"])
                     for c in autotune.fitting(autotune.WIDE_CANDIDATES, h100, 576, 512, 2, phase)}
             for phase in ("forward", "backward")}
    assert (16, 16, 1) in sizes["backward"] and (64, 32, 2) in sizes["forward"], sizes
    assert (64, 32, 1) in sizes["backward"] and (64, 32, 2) not in sizes["backward"], sizes
    assert autotune.shared_memory_bytes({"BLOCK_M": 64, "BLOCK_N": 32}, 576, 512, 2, "forward") == \
        2 * (64 * 576 + 32 * (576 + 512))  # 576 = 512 + 64 columns, not 1024


def test_a_wide_call_on_a_gpu_is_offered_the_small_tiles(monkeypatch):
    """candidates() for CUDA tensors of MLA's head dims (device properties of an H100 stood in)."""
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: types.SimpleNamespace(shared_memory_per_block_optin=227 * 1024))

    def cuda_tensor(dim):
        return types.SimpleNamespace(is_cuda=True, device="cuda:0", shape=(1, 128, 1, dim), element_size=lambda: 2)
    offered = autotune.candidates(cuda_tensor(576), cuda_tensor(512), "backward")
    assert offered and all(c in autotune.WIDE_CANDIDATES for c in offered), offered
    assert all(c in autotune.GPU_CANDIDATES for c in autotune.candidates(cuda_tensor(128), cuda_tensor(128), "backward"))


def test_export_builds_in_the_tuned_configs(tmp_path, monkeypatch):
    import torch

    import attngen as ag
    monkeypatch.setenv("ATTNGEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("ATTNGEN_AUTOTUNE", "cpu")
    monkeypatch.setenv("ATTNGEN_QUIET", "1")
    attn = ag.compile(ag.AttentionSpec(mask_mod=ag.masks.sliding_window(9)))
    attn(*(torch.randn(1, 1, 24, 16) for _ in range(3)))
    source = attn.export(tmp_path / "exported.py").read_text()
    assert "TUNED_CONFIGS = {'cpu/float32/16/16/32/32': {'forward': {'BLOCK_M':" in source


def _store_buckets(worker: int) -> None:
    for i in range(30):
        autotune._store("module", f"bucket-{worker}-{i}", {"forward": {"BLOCK_M": 64, "BLOCK_N": 32}})


def test_processes_tuning_other_buckets_at_once_keep_each_others_choices(tmp_path, monkeypatch):
    """Ranks of one job tune their own buckets of one module at the same moment: every choice survives."""
    monkeypatch.setenv("ATTNGEN_CACHE_DIR", str(tmp_path))
    context = multiprocessing.get_context("fork")
    with context.Pool(4) as pool:
        pool.map(_store_buckets, range(4))
    assert len(autotune.stored("module")) == 4 * 30
