"""The attngen command line, the standalone export, and the shared disk cache."""

import os
import pathlib
import runpy
import subprocess
import sys
import textwrap

import pytest
import torch

import attngen as ag
from attngen.runtime.loader import load_kernels
from attngen.runtime.variants import Variant
from attngen.testing.cases import paged_call

ROOT = pathlib.Path(__file__).parent.parent
ALIBI = str(ROOT / "specs" / "alibi.py")
COMMANDS = ("compile", "show", "export", "check", "fuzz", "bench", "cache")


def attngen(*args, cache_dir, check=True):
    env = {**os.environ, "ATTNGEN_CACHE_DIR": str(cache_dir)}
    result = subprocess.run([sys.executable, "-m", "attngen.cli", *args], env=env, capture_output=True, text=True)
    if check:
        assert result.returncode == 0, result.stderr[-2000:]
    return result


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command, tmp_path):
    assert "usage: attngen " + command in attngen(command, "--help", cache_dir=tmp_path).stdout
    assert command in attngen("--help", cache_dir=tmp_path).stdout


OUT_OF_RANGE = [  # (arguments, the usage error); the comments say what they did before
    (("check", ALIBI, "--examples", "0"), "argument --examples: expected a positive integer, got '0'"),  # held
    (("check", ALIBI, "--heads", "0"), "argument --heads: expected a positive integer, got '0'"),  # 9 failed
    (("fuzz", "--max-len", "0"), "argument --max-len: expected a positive integer, got '0'"),  # ran at 48
    (("fuzz", "--examples", "0"), "argument --examples: expected a positive integer, got '0'"),  # ran 100
    (("bench", ALIBI, "--shape", "-1", "8", "16", "16"), "argument --shape: expected a positive integer, got '-1'"),
    (("bench", ALIBI, "--repeats", "0"), "argument --repeats: expected a positive integer, got '0'"),  # IndexError
    (("bench", ALIBI, "--device", "tpu"), "argument --device: expected cpu, cuda or cuda:N, got 'tpu'"),
    (("show", ALIBI, "--blocks", "-5"), "argument --blocks: expected a positive integer, got '-5'"),
]


@pytest.mark.parametrize("args, message", OUT_OF_RANGE,
                         ids=[" ".join(a for a in args if a != ALIBI) for args, _ in OUT_OF_RANGE])
def test_numbers_and_devices_out_of_range_are_usage_errors(args, message, capsys):
    """Before: counts of 0 ran nothing and reported success, or fell back to the default, and negative
    sizes or unknown devices ended in torch's tracebacks."""
    from attngen.cli import main

    with pytest.raises(SystemExit) as exited:
        main(list(args))
    assert exited.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="refused only where torch sees no GPU")
def test_bench_on_cuda_without_a_gpu_says_so(capsys):
    from attngen.cli import main

    with pytest.raises(SystemExit):
        main(["bench", ALIBI, "--device", "cuda"])  # before: AssertionError: Torch not compiled with CUDA enabled
    assert "argument --device: 'cuda': torch sees 0 CUDA devices here" in capsys.readouterr().err


def test_compile_then_the_cache_is_hit_and_listed_and_cleared(tmp_path):
    assert "generated" in attngen("compile", ALIBI, cache_dir=tmp_path).stdout
    assert "loaded from the cache" in attngen("compile", ALIBI, cache_dir=tmp_path).stdout
    assert "1 cached modules" in attngen("cache", "ls", cache_dir=tmp_path).stdout
    assert "removed 1 cached modules" in attngen("cache", "clear", cache_dir=tmp_path).stdout
    assert not list(tmp_path.glob("*.py"))


def test_show_prints_spec_ir_source_and_draws_the_graph(tmp_path):
    out = attngen("show", ALIBI, "--graph", str(tmp_path / "ir.dot"), cache_dir=tmp_path).stdout
    assert "score_mod = alibi" in out and "# IR" in out and "def score_fn(" in out
    assert "# mask plan" in out and "live = kv_lo <= q_hi" in out
    dot = (tmp_path / "ir.dot").read_text()
    assert dot.startswith("digraph attngen") and "load capture0" in dot


def test_show_prints_the_kernels_of_a_kind_of_call(tmp_path):
    """--call decode shows the split-KV module (its merge kernel), paged the one reading pages, which has no
    backward kernels; the plan of a cache call bounds the keys by kv_lens."""
    decode = attngen("show", ALIBI, "--call", "decode", cache_dir=tmp_path).stdout
    assert "call variant: KV cache (kv_lens, q_offset), split-KV forward (decoding)" in decode
    assert "def _attn_combine(" in decode and "def _attn_bwd_dq(" in decode and "def _load_pages(" not in decode
    paged = attngen("show", ALIBI, "--call", "paged", "--source", cache_dir=tmp_path).stdout
    assert "def _load_pages(" in paged and "def _attn_bwd_dq(" not in paged
    plan = attngen("show", ALIBI, "--call", "cache", "--plan", cache_dir=tmp_path).stdout
    assert "live = (kv_lo < t" in plan
    blocks = attngen("show", ALIBI, "--block-mask", "32x16", "--source", cache_dir=tmp_path).stdout
    assert "forward(q, k, v, *captured, block_mask)" in blocks and "BLOCK_SIZE = (32, 16)" in blocks
    for args, message in [(("--call", "decode", "--blocks", "64"), "describe the plain call: leave out --call"),
                          (("--call", "pages"), "invalid choice: 'pages'"),
                          (("--call", "packed", "--block-mask", "16"), "cannot be combined with a block mask"),
                          (("--block-mask", "16x0"), "expected a block size B or BQxBK (positive integers)")]:
        bad = attngen("show", ALIBI, *args, cache_dir=tmp_path, check=False)
        assert bad.returncode == 2 and message in bad.stderr
    linear = attngen("show", str(ROOT / "specs" / "retention.py"), "--call", "packed", cache_dir=tmp_path, check=False)
    assert linear.returncode == 2 and "linear attention has one kind of call" in linear.stderr


def test_show_machine_code_builds_for_hopper_without_a_gpu(tmp_path):
    out = attngen("show", ALIBI, "--plan", "--machine-code", "64", cache_dir=tmp_path).stdout
    lines = {line.split()[1]: line for line in out.splitlines() if " registers, " in line}
    assert set(lines) == {"_attn_fwd", "_attn_bwd_preprocess", "_attn_bwd_dkdv", "_attn_bwd_dq"}
    assert "0 mma.sync" in lines["_attn_bwd_dkdv"] and " 0 wgmma" not in lines["_attn_bwd_dkdv"]
    retention = attngen("show", str(ROOT / "specs" / "retention.py"), "--ir", "--machine-code", "256",
                        cache_dir=tmp_path).stdout
    assert "_linear_bwd_dkdv" in retention and "<- spills or mma.sync" in retention  # 32-row chunks at D=256
    mla = attngen("show", str(ROOT / "specs" / "softcap.py"), "--machine-code", "576/512", cache_dir=tmp_path).stdout
    assert "x 576/512, untuned tiles" in mla and "_attn_bwd_dkdv" in mla  # MLA's head dims: 16 x 16 tiles
    bad = attngen("show", ALIBI, "--machine-code", "64x", cache_dir=tmp_path, check=False)
    assert bad.returncode == 2 and "expected a head dim D or DQK/DV (positive integers), got '64x'" in bad.stderr


def test_a_file_that_cannot_be_written_is_named_without_a_traceback(tmp_path):
    """``export -o`` into a missing folder, or a cache folder that is a file (before: Python tracebacks)."""
    missing = attngen("export", ALIBI, "-o", str(tmp_path / "missing" / "alibi.py"), cache_dir=tmp_path, check=False)
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    assert missing.stderr.endswith(f"attngen export: {tmp_path / 'missing' / 'alibi.py'}: No such file or directory\n")
    (tmp_path / "file").write_text("")
    cache = attngen("compile", ALIBI, cache_dir=tmp_path / "file", check=False)
    assert cache.returncode == 1 and "Traceback" not in cache.stderr
    assert f"attngen compile: attngen cannot write its kernel cache in {tmp_path / 'file'}" in cache.stderr


def test_show_and_export_a_linear_attention_spec(tmp_path):
    retention = str(ROOT / "specs" / "retention.py")
    out = attngen("show", retention, cache_dir=tmp_path).stdout
    assert "decay = tensor[8]" in out and "# IR (optimized, the feature map" in out and "def _linear_fwd(" in out
    assert "# mask plan" not in out
    assert "forward(q, k, v, g=None)" in attngen("export", retention, "-o", str(tmp_path / "r.py"), cache_dir=tmp_path).stdout
    assert "def _linear_bwd_dkdv(" in (tmp_path / "r.py").read_text()


def test_check_runs_every_property(tmp_path):
    out = attngen("check", str(ROOT / "specs" / "softmax_learnable_sink.py"), "--examples", "3",
                  cache_dir=tmp_path).stdout
    assert "all properties hold" in out and "reference" in out and "GQA = repeated heads" in out


# each traced function differs from itself on tensors (the reference): the kernel computes s, the reference 2 s
SNEAKY = {
    "score_mod": ("""
        import torch, attngen as ag

        def sneaky(s, b, h, q_idx, kv_idx):
            return s * 2.0 if isinstance(s, torch.Tensor) else s

        SPEC = ag.AttentionSpec(score_mod=sneaky)
    """, "kernel differs from the float64 reference"),
    "feature_map": ("""
        import torch, attngen as ag

        def sneaky(x):
            return x * 2.0 if isinstance(x, torch.Tensor) else x

        SPEC = ag.LinearAttentionSpec(feature_map=sneaky, normalize=False)
    """, "reference fails at"),
}


@pytest.mark.parametrize("name", sorted(SNEAKY))
def test_check_fails_with_a_runnable_reproduction(name, tmp_path):
    source, message = SNEAKY[name]
    spec_file = tmp_path / "sneaky.py"
    spec_file.write_text(textwrap.dedent(source))
    result = attngen("check", str(spec_file), "--examples", "2", "--property", "reference", cache_dir=tmp_path,
                     check=False)
    assert result.returncode == 1 and "1 of 1 properties failed" in result.stdout
    snippet = result.stdout.split("reproduce with:\n")[1].split("\n\n")[0]
    script = tmp_path / "reproduce.py"
    script.write_text("\n".join(line[4:] for line in snippet.splitlines()))
    rerun = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                           env={**os.environ, "ATTNGEN_CACHE_DIR": str(tmp_path)})
    assert rerun.returncode != 0 and message in rerun.stderr


def test_check_runs_the_linear_properties(tmp_path):
    out = attngen("check", str(ROOT / "specs" / "gated_linear.py"), "--examples", "3", cache_dir=tmp_path).stdout
    assert "all properties hold" in out and "recurrent step" in out and "chained calls" in out


def test_bench_times_a_linear_spec(tmp_path):
    out = attngen("bench", str(ROOT / "specs" / "gated_linear.py"), "--shape", "1", "2", "40", "16", "--repeats", "1",
                  cache_dir=tmp_path).stdout
    assert "attngen" in out and "reference (materialized)" in out and "recurrent step (torch)" in out


def test_bench_prints_a_table(tmp_path):
    out = attngen("bench", str(ROOT / "specs" / "softcap.py"), "--shape", "1", "8", "32", "16", "--repeats", "1",
                  cache_dir=tmp_path).stdout
    assert "attngen" in out and "reference (materialized)" in out and "fwd+bwd ms" in out


@pytest.mark.parametrize("args, message", [
    (("show", "missing.py"), "does not exist"),
    (("show", ALIBI, "--name", "NOPE"), "defines no 'NOPE'"),
    (("show", ALIBI, "--name", "SLOPES"), "is a Tensor, not an attngen.AttentionSpec"),
    (("show", str(ROOT / "specs" / "linear_elu.py"), "--plan"), "linear attention has no mask plan"),
])
def test_usage_errors_are_one_line(args, message, tmp_path):
    result = attngen(*args, cache_dir=tmp_path, check=False)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


EXPORTED_RUN = textwrap.dedent("""
    import importlib.util, sys, torch
    sys.modules["attngen"] = None  # any 'import attngen' now fails
    spec = importlib.util.spec_from_file_location("exported", sys.argv[1])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    q, k, v, slopes = torch.load(sys.argv[2])
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out, lse = module.forward(q, k, v, slopes)
    out.sum().backward()
    torch.save([out.detach(), lse, q.grad, k.grad, v.grad], sys.argv[3])
""")


def test_exported_file_runs_without_attngen_and_matches(tmp_path):
    slopes = torch.linspace(0.1, 0.9, 4)
    spec = ag.AttentionSpec(score_mod=lambda s, b, h, q_idx, kv_idx: s - slopes[h] * (q_idx - kv_idx),
                            mask_mod=ag.masks.causal)
    attn = ag.compile(spec)
    exported = attn.export(tmp_path / "alibi_kernel.py")
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, 40, 16, generator=gen) for _ in range(3))
    torch.save([q, k, v, slopes], tmp_path / "inputs.pt")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    subprocess.run([sys.executable, "-c", EXPORTED_RUN, str(exported), str(tmp_path / "inputs.pt"),
                    str(tmp_path / "outputs.pt")], env=env, check=True, capture_output=True, cwd=tmp_path)
    out, lse, dq, dk, dv = torch.load(tmp_path / "outputs.pt")
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    expected, stats = attn(q, k, v, return_stats=True)
    expected.sum().backward()
    for got, want in ((out, expected), (lse, stats.lse), (dq, q.grad), (dk, k.grad), (dv, v.grad)):
        assert torch.equal(got, want.detach())


def _refusal(call, *args, **kwargs):
    with pytest.raises((TypeError, ValueError)) as refused:
        call(*args, **kwargs)
    return type(refused.value), str(refused.value)


def test_an_exported_module_takes_inputs_as_attngen_does(tmp_path):
    slopes = torch.linspace(0.1, 0.9, 4)
    attn = ag.compile(ag.AttentionSpec(score_mod=lambda s, b, h, q_idx, kv_idx: s - slopes[h] * (q_idx - kv_idx)))
    module = load_kernels(attn.export(tmp_path / "refusing_alibi.py"), interpret=True)
    q = torch.randn(1, 4, 9, 16)
    wrong = {"dtypes": (q.bfloat16(), q, q), "float64": (q, q, q.double()), "q's head dim": (q[..., :8], q, q),
             "rank": (q[0], q, q), "heads": (q, q[:, :3], q[:, :3]), "k and v lengths": (q, q, q[:, :, :5]),
             "batch": (q, q.expand(2, -1, -1, -1), q.expand(2, -1, -1, -1)), "integers": (q, q, q.int()),
             "head dim 0": (q[..., :0], q[..., :0], q), "device": (q.to("meta"),) * 3}
    for what, (q_, k_, v_) in wrong.items():  # before: the mismatched head dim and dtypes ran, reading out of step
        assert _refusal(module.forward, q_, k_, v_, slopes) == _refusal(attn, q_, k_, v_), what
    compiled = load_kernels(tmp_path / "refusing_alibi.py", interpret=False)  # as imported without TRITON_INTERPRET
    assert "this module's kernels were imported compiled, for a GPU: set TRITON_INTERPRET=1 before importing " \
           "triton" in _refusal(compiled.forward, q, q, q, slopes)[1]  # before: Triton's "0 active drivers"
    assert "forward takes q, k, v and 1 more tensors (1 captured, then no parameters), got 0" in \
        _refusal(module.forward, q, q, q)[1]
    assert "tensor #0 after q, k and v must be a torch.Tensor on q's device (cpu), got meta" in \
        _refusal(module.forward, q, q, q, slopes.to("meta"))[1]
    torch.testing.assert_close(module.forward(q, q, q, slopes)[0], attn(q, q, q), rtol=0, atol=0)
    assert "captured tensor #0 must be a float tensor of rank 1, as the spec's was, got torch.int64 of shape (4,)" \
        in _refusal(module.forward, q, q, q, torch.arange(4))[1]
    assert "captured tensor #0 must be a float tensor of rank 1, as the spec's was, got torch.float32 of shape " \
           "(1, 4)" in _refusal(module.forward, q, q, q, slopes[None])[1]
    assert "captured tensor #0 requires grad, but this module computes no gradient for it" in \
        _refusal(module.forward, q, q, q, slopes.clone().requires_grad_())[1]
    short = slopes[:2]  # for 4 heads: read out of bounds by the kernels (as before), were it not refused
    with_short = ag.compile(ag.AttentionSpec(score_mod=lambda s, b, h, q_idx, kv_idx: s - short[h] * (q_idx - kv_idx)))
    assert _refusal(module.forward, q, q, q, short) == _refusal(with_short, q, q, q)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a bf16 projection's q beside a float32 rotary k, as attngen
        out, lse = module.forward(q.bfloat16(), q, q, slopes)
        assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
        torch.testing.assert_close(out, attn(q.bfloat16(), q, q), rtol=0, atol=0)


def test_an_exported_module_checks_its_per_head_tensors(tmp_path):
    """The tensors after the captured ones, the normalization's per-head parameters, are taken as attngen takes
    them (before: a short sink was read past its end, and an entmax alpha out of range gave NaN rows), and a
    differential module refuses an odd head dim as attngen does (before: it split q and k unevenly). Those the
    spec fixes as numbers may be left out, the others passed alone."""
    q = torch.randn(1, 4, 8, 16)
    sink = torch.zeros(4, requires_grad=True)
    attn = ag.compile(ag.AttentionSpec(normalization=ag.norms.Softmax(sink=sink)))
    module = load_kernels(attn.export(tmp_path / "sink.py"), interpret=True)
    assert torch.equal(module.forward(q, q, q, sink)[0], attn(q, q, q))
    assert torch.equal(module.forward(q, q, q, torch.tensor(0.0))[0], attn(q, q, q))  # one value for every head
    assert "sink has 2 entries; expected one per query head (4)" in _refusal(module.forward, q, q, q, sink[:2])[1]
    for wrong in (sink.long(), sink[:, None]):
        assert _refusal(module.forward, q, q, q, wrong) == (
            TypeError, f"sink must be a floating-point tensor of one entry per query head (4), got a {wrong.dtype} "
                       f"tensor of shape {tuple(wrong.shape)}")
    alpha = torch.tensor([1.5, 1.25, 1.75, 2.0])
    attn = ag.compile(ag.AttentionSpec(normalization=ag.norms.Entmax(alpha=alpha)))
    module = load_kernels(attn.export(tmp_path / "entmax.py"), interpret=True)
    assert torch.equal(module.forward(q, q, q, alpha)[0], attn(q, q, q))
    assert "entmax_alpha must be in (1, 2] for every head, got [1.5, 1.25, 1.0, 2.0]" in \
        _refusal(module.forward, q, q, q, torch.tensor([1.5, 1.25, 1.0, 2.0]))[1]
    attn = ag.compile(ag.AttentionSpec(differential=0.5))
    module = load_kernels(attn.export(tmp_path / "differential.py"), interpret=True)
    assert torch.equal(module.forward(q, q, q, torch.full((4,), 0.5))[0], attn(q, q, q))
    assert torch.equal(module.forward(q, q, q)[0], attn(q, q, q))  # the spec's number by default
    assert "forward takes q, k, v and 1 more tensors (0 captured, then lam; those the spec fixes may be left out: " \
           "lam=0.5), got 2" in _refusal(module.forward, q, q, q, sink, sink)[1]
    odd = q[..., :15]
    assert _refusal(module.forward, odd, odd, odd, torch.full((4,), 0.5)) == _refusal(attn, odd, odd, odd)
    affine = ag.compile(ag.AttentionSpec(normalization=ag.norms.AffineSoftmax(alpha=sink + 1.5, beta=0.25)))
    module = load_kernels(affine.export(tmp_path / "affine.py"), interpret=True)  # a tensor, then a number
    assert module.PARAMETER_DEFAULTS == (None, 0.25)
    assert torch.equal(module.forward(q, q, q, *affine.exported_tensors())[0], affine(q, q, q))
    assert torch.equal(module.forward(q, q, q, sink + 1.5)[0], affine(q, q, q))  # the learnable alpha alone
    assert "then alpha, beta; those the spec fixes may be left out: beta=0.25), got 0" in \
        _refusal(module.forward, q, q, q)[1]


def test_an_exported_module_checks_reads_through_a_function_of_one_offset(tmp_path):
    """A table read at buckets of ``kv_idx - q_idx`` that grow with the distance (T5's, unclamped): attngen
    tries the buckets at each offset, and so does the exported module (before: it read past the table)."""
    def spec(table):
        return ag.AttentionSpec(score_mod=lambda s, b, h, q_idx, kv_idx:
                                s + table[h, torch.log1p(torch.abs(kv_idx - q_idx).float()).long()])
    table = torch.randn(2, 4)  # buckets 0..3: offsets up to 53 in magnitude
    attn = ag.compile(spec(table))
    module = load_kernels(attn.export(tmp_path / "buckets.py"), interpret=True)
    assert any(read[2][0] == "function" for read in module.INDEX_READS)
    q = torch.randn(1, 2, 50, 16)
    torch.testing.assert_close(module.forward(q, q, q, table)[0], attn(q, q, q), rtol=0, atol=0)
    long_q = torch.randn(1, 2, 60, 16)  # offsets up to 59: bucket 4
    error = _refusal(module.forward, long_q, long_q, long_q, table)
    assert error == _refusal(attn, long_q, long_q, long_q)
    assert "indexed in dim 1 with an expression of q_idx and kv_idx that runs from 0 to 4 in this call" in error[1]


def test_an_exported_kv_cache_module_takes_the_cache_as_attngen_does(tmp_path):
    """``attngen export --call cache`` / ``decode`` (split-KV) / ``paged``: ``forward`` takes the call's kv_lens,
    q_offset (and block_table) as ``attn(...)`` does, bit for bit (forward and backward where there is one);
    other calls' kernels are not exported."""
    alibi = runpy.run_path(ALIBI)
    attn, slopes = ag.compile(alibi["SPEC"]), alibi["SLOPES"]
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 8, 3, 16, generator=gen)
    k, v = (torch.randn(2, 2, 40, 16, generator=gen) for _ in range(2))
    lens = torch.tensor([17, 40])
    for call, mode in (("cache", "prefill"), ("decode", "decode")):
        if call == "decode":
            attngen("export", ALIBI, "--call", call, "-o", str(tmp_path / f"{call}.py"), cache_dir=tmp_path)
        else:
            attn.export(tmp_path / f"{call}.py", call=call)
        module = load_kernels(tmp_path / f"{call}.py", interpret=True)
        assert set(module.CALL_CAPTURES) == {"kv_lens", "q_offset"}
        for cache in ({}, {"kv_lens": lens}, {"kv_lens": lens, "q_offset": 5}, {"q_offset": torch.tensor([0, 9])}):
            exported, expected = ([t.clone().requires_grad_() for t in (q, k, v)] for _ in range(2))
            out, lse = module.forward(*exported, slopes, **cache)
            (out.sum() + lse.sum()).backward()
            want, stats = attn(*expected, return_stats=True, mode=mode, **{"kv_lens": 40, **cache})
            (want.sum() + stats.lse.sum()).backward()
            for got, wanted in ((out, want), (lse, stats.lse), *zip((t.grad for t in exported),
                                                                    (t.grad for t in expected))):
                assert torch.equal(got, wanted), (call, cache)
        for wrong in ({"kv_lens": lens.float()}, {"kv_lens": 41}, {"q_offset": torch.tensor([1, 2, 3])}):
            assert _refusal(module.forward, q, k, v, slopes, **wrong) == _refusal(attn, q, k, v, **wrong), wrong
    attngen("export", ALIBI, "--call", "paged", "-o", str(tmp_path / "paged.py"), cache_dir=tmp_path)
    module = load_kernels(tmp_path / "paged.py", interpret=True)
    (_, k_pages, v_pages), paged = paged_call(q, k, v, [17, 40], page_size=16, seed=0)
    for extra in ({}, {"q_offset": 5}):
        out, lse = module.forward(q, k_pages, v_pages, slopes, **paged, **extra)
        want, stats = attn(q, k_pages, v_pages, return_stats=True, mode="decode", **paged, **extra)
        assert torch.equal(out, want) and torch.equal(lse, stats.lse)
    table = paged["block_table"]
    for wrong in ({**paged, "block_table": table + 1}, {**paged, "block_table": table[:1]},
                  {"block_table": table, "kv_lens": None}):
        assert _refusal(module.forward, q, k_pages, v_pages, slopes, **wrong) == \
            _refusal(attn, q, k_pages, v_pages, **wrong), wrong
    assert _refusal(module.forward, q, k_pages[:, :1], v_pages, slopes, **paged) == \
        _refusal(attn, q, k_pages[:, :1], v_pages, **paged)
    biases = torch.randn(45)  # read at the queries' positions in the cache, q_idx + q_offset
    by_position = ag.compile(ag.AttentionSpec(score_mod=lambda s, b, h, q_idx, kv_idx: s + biases[q_idx]))
    module = load_kernels(by_position.export(tmp_path / "by_position.py", call="cache"), interpret=True)
    torch.testing.assert_close(module.forward(q, k, v, biases, kv_lens=lens, q_offset=42)[0],  # positions up to 44
                               by_position(q, k, v, kv_lens=lens, q_offset=42), rtol=0, atol=0)
    refused = _refusal(module.forward, q, k, v, biases, kv_lens=lens, q_offset=43)  # up to 45: past the biases
    assert "captured tensor #0 of shape (45,) is indexed in dim 0 with an expression of b and q_idx through the " \
           "values of q_offset that runs from 43 to 45" in refused[1]
    assert refused == _refusal(by_position, q, k, v, kv_lens=lens, q_offset=43)
    with pytest.raises(ValueError, match="call must be one of 'plain', 'cache', 'decode', 'paged', 'packed', "
                                         "'dropout', got 'blocks'"):
        attn.export(tmp_path / "blocks.py", call="blocks")


def _same_call(module_call, attngen_call, inputs):
    """Run both calls on copies of ``inputs`` (q, k, v) and their backward: the outputs, the row statistics
    and the gradients agree bit for bit."""
    exported, expected = ([t.clone().requires_grad_() for t in inputs] for _ in range(2))
    out, lse = module_call(*exported)
    (out.sum() + lse.sum()).backward()
    want, stats = attngen_call(*expected)
    (want.sum() + stats.lse.sum()).backward()
    for got, wanted in ((out, want), (lse, stats.lse), *zip((t.grad for t in exported), (t.grad for t in expected))):
        assert torch.equal(got, wanted)


def test_an_exported_packed_module_takes_packed_sequences_as_attngen_does(tmp_path):
    """``attngen export --call packed``: ``forward`` takes q, k, v [tokens, heads, D] with cu_seqlens_q / _k and
    returns packed outputs, as ``attn(...)`` does bit for bit (forward and backward); it refuses what attngen
    refuses, and checks the spec's own reads within each sequence."""
    alibi = runpy.run_path(ALIBI)
    attn, slopes = ag.compile(alibi["SPEC"]), alibi["SLOPES"]
    attngen("export", ALIBI, "--call", "packed", "-o", str(tmp_path / "packed.py"), cache_dir=tmp_path)
    module = load_kernels(tmp_path / "packed.py", interpret=True)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(12, 8, 16, generator=gen)
    k, v = (torch.randn(20, 2, 16, generator=gen) for _ in range(2))
    packed = {"cu_seqlens_q": torch.tensor([0, 5, 5, 12]), "cu_seqlens_k": torch.tensor([0, 9, 11, 20])}
    _same_call(lambda *qkv: module.forward(*qkv, slopes, **packed),
               lambda *qkv: attn(*qkv, return_stats=True, **packed), (q, k, v))
    for wrong in ({**packed, "cu_seqlens_q": torch.tensor([0, 5, 5, 13])},
                  {**packed, "cu_seqlens_k": torch.tensor([0.0, 9.0, 11.0, 20.0])},
                  {**packed, "cu_seqlens_k": torch.tensor([0, 20])}):
        assert _refusal(module.forward, q, k, v, slopes, **wrong) == _refusal(attn, q, k, v, **wrong), wrong
    assert _refusal(module.forward, q[None], k, v, slopes, **packed) == _refusal(attn, q[None], k, v, **packed)

    def nested(lengths, heads):  # SDPA's layout of jagged sequences: [batch, heads, j, head_dim]
        return torch.nested.nested_tensor([torch.randn(n, heads, 16, generator=gen) for n in lengths],
                                          layout=torch.jagged).transpose(1, 2)
    q_nested, k_nested, v_nested = nested([5, 2, 7], 8), nested([9, 2, 9], 2), nested([9, 2, 9], 2)
    got, want = module.forward(q_nested, k_nested, v_nested, slopes)[0], attn(q_nested, k_nested, v_nested)
    assert got.is_nested and torch.equal(got.offsets(), want.offsets()) and torch.equal(got.values(), want.values())
    for args, call in (((q_nested, k, v), {}), ((q_nested, k_nested, v_nested), packed)):
        assert _refusal(module.forward, *args, slopes, **call) == _refusal(attn, *args, **call)
    biases = torch.randn(7)  # read at positions within a sequence: the longest has 7 queries
    by_position = ag.compile(ag.AttentionSpec(score_mod=lambda s, b, h, q_idx, kv_idx: s + biases[q_idx]))
    module = load_kernels(by_position.export(tmp_path / "by_position.py", call="packed"), interpret=True)
    assert module.SEQUENCE_READS
    torch.testing.assert_close(module.forward(q, k, v, biases, **packed)[0], by_position(q, k, v, **packed),
                               rtol=0, atol=0)
    longer = {**packed, "cu_seqlens_q": torch.tensor([0, 4, 4, 12])}  # 8 queries: past the biases
    refused = _refusal(module.forward, q, k, v, biases, **longer)
    assert "captured tensor #0 of shape (7,) is indexed with q_idx in dim 0, which runs to 7" in refused[1]
    assert refused == _refusal(by_position, q, k, v, **longer)
    pooled = ag.compile(ag.AttentionSpec(stats=("lse", ag.stats.pooled(4, 4))))  # before: exported, maps straddling
    with pytest.raises(ValueError, match="pooled maps are not defined for packed sequences"):
        pooled.export(tmp_path / "pooled.py", call="packed")


def test_an_exported_block_mask_module_takes_block_masks_as_attngen_does(tmp_path):
    """``attngen export --block-mask BQxBK`` (``attn.with_block_mask(...).export``), with any kind of call but
    packed sequences: ``forward`` takes ``block_mask`` as ``attn(...)`` does, bit for bit (forward and backward):
    a bool block matrix, an attngen.BlockMask (bool, or per-row indices) or a FlexAttention BlockMask, of the
    blocks it was built for (before: such calls were not exported)."""
    from torch.nn.attention.flex_attention import BlockMask as FlexBlockMask
    from torch.nn.attention.flex_attention import create_block_mask

    alibi = runpy.run_path(ALIBI)
    attn, slopes = ag.compile(alibi["SPEC"]), alibi["SLOPES"]
    attngen("export", ALIBI, "--call", "cache", "--block-mask", "16x8", "-o", str(tmp_path / "blocks.py"),
            cache_dir=tmp_path)
    module = load_kernels(tmp_path / "blocks.py", interpret=True)
    assert module.BLOCK_SIZE == (16, 8)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 8, 32, 16, generator=gen)
    k, v = (torch.randn(2, 2, 40, 16, generator=gen) for _ in range(2))
    cache = {"kv_lens": torch.tensor([35, 40])}
    matrix = torch.rand(2, 1, 2, 5, generator=gen) < 0.6
    flex = create_block_mask(alibi["SPEC"].mask_mod, 1, 1, 32, 40, device="cpu", BLOCK_SIZE=(16, 8))
    indices = torch.tensor([[[[4, -1], [0, 2]]]])
    for block_mask in (matrix, ag.BlockMask(matrix, (16, 8)), ag.BlockMask(indices, (16, 8)),
                       FlexBlockMask.from_kv_blocks(flex.kv_num_blocks, flex.kv_indices, flex.full_kv_num_blocks,
                                                    flex.full_kv_indices, BLOCK_SIZE=flex.BLOCK_SIZE)):
        _same_call(lambda *qkv: module.forward(*qkv, slopes, block_mask=block_mask, **cache),
                   lambda *qkv: attn(*qkv, block_mask=block_mask, return_stats=True, **cache), (q, k, v))
    assert "the same blocks without it, BlockMask.from_kv_blocks(" in \
        _refusal(module.forward, q, k, v, slopes, block_mask=flex, **cache)[1]  # its own mask_mod: attngen's?
    assert _refusal(module.forward, q, k, v, slopes, block_mask=ag.BlockMask(matrix, 8), **cache) == (
        ValueError, "block_mask has blocks of 8 x 8 tokens; this module's kernels were built for blocks of 16 x 8: "
                    "export it for those")
    assert "(2 x 5 blocks over 30 x 40 tokens; blocks of this module's size that do not split the tokens evenly " \
        "are passed as attngen.BlockMask(block_mask, BLOCK_SIZE))" in \
        _refusal(module.forward, q[:, :, :30], k, v, slopes, block_mask=matrix, **cache)[1]  # 15 x 8 blocks
    for wrong in (torch.cat([matrix, matrix[:1]]), matrix.int(), matrix[..., :3],  # 3 kv blocks: 40 keys unevenly
                  ag.BlockMask(torch.tensor([[[[5]]]]), (16, 8)),
                  matrix.to("meta")):  # before: the module passed another device's tensor to the kernels
        assert _refusal(module.forward, q, k, v, slopes, block_mask=wrong, **cache) == \
            _refusal(attn, q, k, v, block_mask=wrong, **cache), wrong
    with pytest.raises(ValueError, match="packed sequences cannot be combined with a block mask"):
        attn.with_block_mask(16).export(tmp_path / "packed.py", call="packed")


def test_an_exported_dropout_module_drops_what_attngen_drops(tmp_path):
    """``export(path, call="dropout")``: ``forward`` takes dropout_p (the spec's by default) and seed, and drops
    the weights an attngen call with that seed drops, bit for bit (forward and backward)."""
    alibi = runpy.run_path(ALIBI)
    attn, slopes = ag.compile(alibi["SPEC"]), alibi["SLOPES"]
    module = load_kernels(attn.export(tmp_path / "dropout.py", call="dropout"), interpret=True)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 8, 9, 16, generator=gen)
    k, v = (torch.randn(2, 2, 13, 16, generator=gen) for _ in range(2))
    dropout = {"dropout_p": 0.3, "seed": 7}
    _same_call(lambda *qkv: module.forward(*qkv, slopes, **dropout),
               lambda *qkv: attn(*qkv, return_stats=True, **dropout), (q, k, v))
    assert not torch.equal(module.forward(q, k, v, slopes, dropout_p=0.3, seed=8)[0], attn(q, k, v, **dropout))
    torch.manual_seed(3)
    drawn = module.forward(q, k, v, slopes, dropout_p=0.3)[0]
    torch.manual_seed(3)
    assert torch.equal(drawn, attn(q, k, v, dropout_p=0.3))  # the seed drawn from torch's generator alike
    assert torch.equal(module.forward(q, k, v, slopes, dropout_p=0.0)[0], attn(q, k, v))
    for wrong in ({"dropout_p": 1.0}, {"dropout_p": -0.1}, {"dropout_p": 0.1, "seed": 1.5}):
        assert _refusal(module.forward, q, k, v, slopes, **wrong) == _refusal(attn, q, k, v, **wrong), wrong
    assert "missing 1 required keyword-only argument: 'dropout_p'" in _refusal(module.forward, q, k, v, slopes)[1]
    with_rate = ag.compile(ag.AttentionSpec(score_mod=alibi["alibi"], dropout_p=0.25))
    module = load_kernels(with_rate.export(tmp_path / "with_rate.py", call="dropout"), interpret=True)
    assert torch.equal(module.forward(q, k, v, slopes, seed=5)[0], with_rate(q, k, v, seed=5))


def test_an_exported_sparsemax_module_decodes_with_its_unsplit_kernels(tmp_path):
    """Sparsemax's threshold needs passes over the whole row: its decoding kernels are the unsplit ones (an
    exported split-KV module before launched kernels it did not define)."""
    attn = ag.compile(ag.AttentionSpec(normalization=ag.norms.Sparsemax(), mask_mod=ag.masks.causal))
    path = attn.export(tmp_path / "sparsemax_decode.py", call="decode")
    assert "split-KV" not in path.read_text().split('"""')[1]
    module = load_kernels(path, interpret=True)
    gen = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 4, 1, 16, generator=gen), *(torch.randn(2, 2, 30, 16, generator=gen) for _ in range(2))
    out, = module.forward(q, k, v, kv_lens=torch.tensor([10, 30]))  # sparsemax has no lse
    assert torch.equal(out, attn(q, k, v, kv_lens=torch.tensor([10, 30]), mode="decode"))


def test_an_exported_linear_module_takes_inputs_as_attngen_does(tmp_path):
    attn = ag.compile(ag.LinearAttentionSpec(feature_map="identity", decay="gated", normalize=False))
    module = load_kernels(attn.export(tmp_path / "refusing_gated.py"), interpret=True)
    q = torch.randn(1, 2, 9, 16)
    g = -torch.rand(1, 2, 9)
    assert _refusal(module.forward, q, q, q[..., :8].bfloat16(), g) == _refusal(attn, q, q, q[..., :8].bfloat16(),
                                                                                  log_decay=g)
    assert "q and k must have the same head dim, got 8 and 16" in _refusal(module.forward, q[..., :8], q, q, g)[1]
    assert "q and k must have the same length, got 9 and 5" in _refusal(module.forward, q, q[:, :, :5], q[:, :, :5], g)[1]
    assert "g must be a float32 tensor (1, 2, 9) on q's device (cpu), got torch.float32 (1, 2, 8)" in \
        _refusal(module.forward, q, q, q, g[..., :8])[1]
    out, state, state_n = module.forward(q, q, q, g)
    assert "state_n must be a float32 tensor (1, 2, 16) on q's device (cpu), got torch.float32 (1, 2, 8)" in \
        _refusal(module.forward, q, q, q, g, state=(state, state_n[..., :8]))[1]
    assert "state must be None or the pair" in _refusal(module.forward, q, q, q, g, state=state)[1]
    torch.testing.assert_close(out, attn(q, q, q, log_decay=g), rtol=0, atol=0)  # the spec's scale (1/4), not 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module.forward(q, q.bfloat16(), q, g)[0]
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out, attn(q, q.bfloat16(), q, log_decay=g), rtol=0, atol=0)
    assert "this spec's decay is learnable or gated: pass g" in _refusal(module.forward, q, q, q)[1]
    meta = q.to("meta")
    assert _refusal(module.forward, meta, meta, meta, g.to("meta")) == \
        _refusal(attn, meta, meta, meta, log_decay=g.to("meta"))
    compiled = load_kernels(tmp_path / "refusing_gated.py", interpret=False)
    assert "set TRITON_INTERPRET=1" in _refusal(compiled.forward, q, q, q, g)[1]
    retention = ag.compile(ag.LinearAttentionSpec(feature_map="identity", decay=0.9, normalize=False, scale=0.5))
    module = load_kernels(retention.export(tmp_path / "retention.py"), interpret=True)
    torch.testing.assert_close(module.forward(q, q, q)[0], retention(q, q, q), rtol=0, atol=0)  # its decay, its scale


CONCURRENT_COMPILE = textwrap.dedent("""
    import sys, torch, attngen as ag
    slopes = torch.linspace(0.1, 0.9, 4)
    spec = ag.AttentionSpec(score_mod=lambda s, b, h, q_idx, kv_idx: s - slopes[h] * (q_idx - kv_idx),
                            mask_mod=ag.masks.causal & ag.masks.sliding_window(20))
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, 33, 16, generator=gen) for _ in range(3))
    torch.save(ag.compile(spec)(q, k, v), sys.argv[1])
""")


def test_four_processes_compiling_one_spec_share_one_consistent_entry(tmp_path):
    env = {**os.environ, "ATTNGEN_CACHE_DIR": str(tmp_path / "cache")}
    processes = [subprocess.Popen([sys.executable, "-c", CONCURRENT_COMPILE, str(tmp_path / f"out{i}.pt")],
                                  env=env, stderr=subprocess.PIPE) for i in range(4)]
    for process in processes:
        assert process.wait(timeout=300) == 0, process.stderr.read().decode()[-2000:]
    outputs = [torch.load(tmp_path / f"out{i}.pt") for i in range(4)]
    assert all(torch.equal(outputs[0], other) for other in outputs[1:])
    entries = list((tmp_path / "cache").iterdir())
    assert len(entries) == 1 and entries[0].suffix == ".py", entries
