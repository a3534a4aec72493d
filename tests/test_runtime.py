"""Compile cache, generated source, CLI entry point, and the GPU path."""

import ast
import contextlib
import copy
import os
import re
import subprocess
import sys
import textwrap
import threading
import time
import types
import warnings

import pytest
import torch
import triton
from triton.runtime.interpreter import InterpretedFunction

import attngen as ag
from attngen.codegen.prune import without_unused_functions
from attngen.qkv import GRID_AXIS_LIMIT
from attngen.runtime.loader import load_kernels
from attngen.runtime.variants import Variant

SPEC_SCRIPT = textwrap.dedent("""
    import json, torch, attngen as ag
    slopes = torch.linspace(0.1, 0.8, 4)
    spec = ag.AttentionSpec(score_mod=lambda s, b, h, q_idx, kv_idx: s - slopes[h] * (q_idx - kv_idx),
                            mask_mod=ag.masks.causal & ag.masks.sliding_window(32))
    attn = ag.compile(spec)
    print(json.dumps({"hit": attn.cache_hit, "key": attn.key}))
""")


def _run(script, cache_dir):
    env = {**os.environ, "ATTNGEN_CACHE_DIR": str(cache_dir)}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    return result.stdout.strip().splitlines()[-1]


def test_second_process_reuses_the_disk_cache(tmp_path):
    first = _run(SPEC_SCRIPT, tmp_path)
    second = _run(SPEC_SCRIPT, tmp_path)
    assert '"hit": false' in first and '"hit": true' in second
    assert first.split('"key"')[1] == second.split('"key"')[1]
    assert len(list(tmp_path.glob("*.py"))) == 1


def test_compiled_attention_shows_its_spec_and_module():
    """repr names the spec, the kind of call and the generated module (was ``<... object at 0x...>``)."""
    attn = ag.compile(ag.AttentionSpec(mask_mod=ag.masks.causal))
    decode = attn.for_call(Variant(cache=True, split_kv=True))
    assert repr(attn) == ("CompiledAttention(score_mod = None, mask_mod = causal, normalization = Softmax(sink=None), "
                          f"scale = 1/sqrt(Dqk), stats = ('lse',); {attn.path})")
    assert "call variant: KV cache (kv_lens, q_offset), split-KV forward (decoding); " in repr(decode)
    linear = ag.compile(ag.LinearAttentionSpec())
    assert repr(linear).startswith("CompiledLinearAttention(feature_map = 'elu+1', decay = None,")
    assert repr(linear).endswith(f"; {linear.path})")


def test_a_cache_folder_that_cannot_be_written_is_named(tmp_path, monkeypatch):
    """ATTNGEN_CACHE_DIR pointing at a file (or below one) says so and names the variable (was a bare
    FileExistsError: [Errno 17] File exists)."""
    (tmp_path / "file").write_text("")
    for folder in (tmp_path / "file", tmp_path / "file" / "sub"):
        monkeypatch.setenv("ATTNGEN_CACHE_DIR", str(folder))
        with pytest.raises(OSError, match=f"attngen cannot write its kernel cache in {re.escape(str(folder))} "
                                          r"\(.*\); set ATTNGEN_CACHE_DIR to a folder it can write"):
            ag.compile(ag.AttentionSpec(score_mod=lambda s, b, h, q_idx, kv_idx: s * 1.25))


def test_generated_source_is_deterministic(tmp_path, monkeypatch):
    sources = []
    for sub in ("a", "b"):
        monkeypatch.setenv("ATTNGEN_CACHE_DIR", str(tmp_path / sub))
        spec = ag.AttentionSpec(score_mod=lambda s, b, h, q_idx, kv_idx: 4.0 * torch.tanh(s / 4.0),
                                mask_mod=ag.masks.causal)
        attn = ag.compile(spec)
        assert not attn.cache_hit
        sources.append(attn.source)
    assert sources[0] == sources[1]


def test_generated_source_documents_its_spec_and_skips_causal_blocks():
    source = ag.compile(ag.AttentionSpec(mask_mod=ag.masks.causal)).source
    assert "mask_mod = causal" in source and "SPEC_FINGERPRINT" in source
    assert "kv_end = tl.maximum(tl.minimum(q_hi + 1, LK), 0)" in source.split("def kv_segments")[1]
    assert "live = kv_lo <= q_hi" in source.split("def block_state")[1].split("return live")[0]


def _top_level_functions(source):
    """{name: decorated by triton.jit} of the module's top-level functions, and every name its code uses."""
    tree = ast.parse(source)
    functions = {node.name: [ast.unparse(d) for d in node.decorator_list] == ["triton.jit"]
                 for node in tree.body if isinstance(node, ast.FunctionDef)}
    return functions, {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}


@pytest.mark.parametrize("variant", [Variant(), Variant(cache=True, split_kv=True, paged=True)], ids=str)
@pytest.mark.parametrize("norm", [ag.norms.Softmax(), ag.norms.Entmax(1.5), ag.norms.StickBreaking()], ids=str)
def test_generated_modules_keep_only_the_functions_they_call(norm, variant):
    """Of the shared helpers a module keeps those it calls (softcap's tanh, not atan); a paged variant, which
    refuses gradients, keeps no backward kernel; the threshold family's forward, which does not split its keys,
    no merge of split partials (calls never ask it for that variant)."""
    spec = ag.AttentionSpec(score_mod=lambda s, b, h, q_idx, kv_idx: 20.0 * torch.tanh(s / 20.0),
                            normalization=norm, mask_mod=ag.masks.causal)
    functions, named = _top_level_functions(ag.compile(spec).for_call(variant).source)
    unused = [name for name, jit in functions.items() if (jit or name.startswith("_")) and name not in named]
    assert unused in ([], ["_"])  # the register_fake implementations are all named _
    assert "_tanh" in functions and not {"_atan", "_expm1", "_pow_int"} & set(functions)
    backward = {"score_fn_backward", "_attn_bwd_dkdv", "_attn_bwd_dq", "_stick_bwd"} & set(functions)
    assert bool(backward) != variant.paged
    assert ("_attn_combine" in functions) == (variant.split_kv and not isinstance(norm, ag.norms.Entmax))


def test_unused_functions_go_with_their_comments_until_none_is_left():
    source = textwrap.dedent("""\
        import triton


        # the section's header, apart


        # about _inner, attached
        @triton.jit
        def _inner(x):
            return x


        @triton.jit
        def _outer(x):
            return _inner(x)


        def _private(x):
            return x


        def public(x):
            return _kept(x)


        @triton.jit
        def _kept(x):
            return x


        @op.register_fake
        def _(x):
            return x
        """)
    pruned = without_unused_functions(source)
    assert "_inner" not in pruned and "_outer" not in pruned and "_private" not in pruned
    assert "attached" not in pruned and "# the section's header, apart" in pruned
    assert all(f"def {name}(" in pruned for name in ("public", "_kept", "_"))


def test_generated_mods_keep_their_lines_short():
    """A 32-entry torch.dot is 64 loads: each product gets its own line, none of a whole sum, and loads at
    constant index 0 leave their stride out."""
    q_rope, k_rope = torch.randn(1, 2, 8, 32), torch.randn(1, 1, 8, 32)
    spec = ag.AttentionSpec(score_mod=lambda s, b, h, q_idx, kv_idx:
                            s + torch.dot(q_rope[b, h, q_idx], k_rope[b, 0, kv_idx]))
    score_fn = ag.compile(spec).source.split("def score_fn(")[1].split("return score")[0]
    lines = score_fn.splitlines()[3:]
    assert len(lines) >= 32 and max(map(len, lines)) < 250
    assert "0 * cap1_s1" not in score_fn and "kv_idx * cap1_s2 + 31 * cap1_s3" in score_fn


def _scaled_by(table):
    return ag.AttentionSpec(score_mod=lambda s, b, h, q_idx, kv_idx: s * table[h])


@pytest.mark.parametrize("make", [lambda: ag.compile(ag.AttentionSpec()), lambda: ag.compile(ag.LinearAttentionSpec())],
                         ids=["attention", "linear"])
def test_kernels_launch_on_the_device_of_q(make, monkeypatch):
    """Triton launches on the current CUDA device: a module's run_forward and run_backward switch to q's
    device where it is another (a model on cuda:1 without torch.cuda.set_device), and only to launch."""
    module = make()._kernels(torch.device("cpu"))
    assert all(hasattr(getattr(module, name), "__wrapped__") for name in ("run_forward", "run_backward"))
    entered = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", lambda device: entered.append(device) or contextlib.nullcontext())
    run = module._on_its_device(lambda q, *args, **kwargs: (args, kwargs))

    def on(device_type, index):
        return types.SimpleNamespace(is_cuda=device_type == "cuda", device=types.SimpleNamespace(index=index))

    assert run(on("cuda", 1), 2, memo=3) == ((2,), {"memo": 3}) and [d.index for d in entered] == [1]
    for q, launch in ((on("cuda", 0), True), (on("cuda", 1), False), (on("cpu", None), True)):
        assert run(q, launch=launch) == ((), {"launch": launch})
    assert len(entered) == 1


def test_captured_values_are_kernel_arguments_not_part_of_the_key():
    assert ag.compile(_scaled_by(torch.rand(2))).key == ag.compile(_scaled_by(torch.rand(3))).key
    assert ag.compile(_scaled_by(torch.rand(2))).key != ag.compile(_scaled_by(torch.rand(2, 2)[0].long())).key




def test_kernels_imported_at_once_from_two_threads_keep_their_kind(tmp_path):
    """``triton.jit`` decides at decoration whether a kernel is interpreted, from a switch global to the
    process: a compiled module imported while an interpreted one is (a model's first CUDA and CPU calls made
    from two threads) must neither flip the other's kernels nor take its switch."""
    slow_module = "import time\nimport triton\ntime.sleep(0.3)\n\n@triton.jit\ndef kernel(x):\n    pass\n"
    for name in ("cpu", "cuda"):
        (tmp_path / f"{name}.py").write_text(slow_module)
    modules = {}

    def load(name, interpret):
        modules[name] = load_kernels(tmp_path / f"{name}.py", interpret=interpret)

    threads = [threading.Thread(target=load, args=("cpu", True)), threading.Thread(target=load, args=("cuda", False))]
    switch = triton.knobs.runtime.interpret
    for thread in threads:
        thread.start()
        time.sleep(0.1)
    for thread in threads:
        thread.join()
    assert isinstance(modules["cpu"].kernel, InterpretedFunction)
    assert not isinstance(modules["cuda"].kernel, InterpretedFunction)
    assert triton.knobs.runtime.interpret == switch


def test_interpreted_calls_from_several_threads_give_their_own_results():
    """Triton's interpreter swaps functions of triton.language in and out around each launch, for the whole
    process: calls made from several threads at once (a CPU server's request threads) broke each other's
    launches ('Did you forget to add @triton.jit ?'); launches are now taken one at a time."""
    specs = [ag.AttentionSpec(score_mod=lambda s, b, h, q_idx, kv_idx: s - 0.1 * (q_idx - kv_idx),
                              mask_mod=ag.masks.causal), ag.AttentionSpec(normalization=ag.norms.Sigmoid())]
    attns = [ag.compile(spec) for spec in specs]
    gen = torch.Generator().manual_seed(0)
    inputs = [[torch.randn(1, 2, 40, 16, generator=gen) for _ in range(3)] for _ in range(4)]
    expected = [[attn(*qkv) for qkv in inputs] for attn in attns]
    failures = []

    def work(which):
        try:
            for _ in range(3):
                for qkv, out in zip(inputs, expected[which]):
                    assert torch.equal(attns[which](*qkv), out)
        except Exception as error:  # noqa: BLE001 - reported by the main thread
            failures.append(repr(error)[:300])

    threads = [threading.Thread(target=work, args=(i % 2,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures


def test_interpreted_kernels_raise_no_numpy_warnings():
    """Triton's interpreter computes every lane of a tile, masked ones too, and both sides of a where (stick-
    breaking's entropy term divides 0 by 0 on the side it drops): the launches keep numpy's floating-point
    warnings off, so examples and the CLI print no RuntimeWarning (a warnings-as-errors run passes, forward and
    backward)."""
    spec = ag.AttentionSpec(normalization=ag.norms.StickBreaking(), mask_mod=ag.masks.causal, stats=("entropy",))
    q, k, v = (torch.randn(1, 2, 40, 16, generator=torch.Generator().manual_seed(i), requires_grad=True)
               for i in range(3))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        out, stats = ag.compile(spec)(q, k, v, return_stats=True)
        (out.square().sum() + stats.entropy.sum()).backward()


@pytest.mark.parametrize("spec, call", [
    (ag.AttentionSpec(mask_mod=ag.masks.document(torch.arange(16).repeat(2048, 1) // 5), dropout_p=0.1,
                      stats=("lse", "max", ag.stats.pooled(8, 8, "mean", name="map"))), {}),
    (ag.AttentionSpec(mask_mod=ag.masks.sliding_window(4)), {"mode": "decode", "kv_lens": torch.full((2048,), 9)}),
    (ag.AttentionSpec(normalization=ag.norms.Sparsemax(), mask_mod=ag.masks.causal, top_k=4), {}),
    (ag.AttentionSpec(normalization=ag.norms.StickBreaking(), mask_mod=ag.masks.causal), {}),
    (ag.AttentionSpec(differential=0.5, mask_mod=ag.masks.causal), {}),
], ids=["document_dropout_maps", "split_kv_gqa_packed", "sparsemax_top_k", "stick_breaking", "differential"])
def test_launch_grids_stay_within_cudas_programs_per_axis(spec, call):
    """CUDA launches at most 65535 programs along a grid's axes 1 and 2: one program per (batch entry,
    head) along one axis would pass it at 2048 sequences of 32 heads, a decoding batch, and fail to
    launch on a GPU. The grids of every kernel of a forward and backward are recorded (not run: the
    interpreter would take minutes over 2**16 programs)."""
    from attngen.testing.gpu_compile import intercepted_launches

    q_len = 1 if call.get("mode") == "decode" else 16
    q, k, v = (torch.randn(2048, heads, length, 16, requires_grad=True)
               for heads, length in ((32, q_len), (8, 16), (8, 16)))
    attn = ag.compile(spec)
    grids = {}
    with intercepted_launches(lambda kernel, grid, args, kwargs: grids.setdefault(kernel.fn.__name__, grid)):
        out = attn(q, k, v, **call)
        if "mode" not in call:
            out.sum().backward()
    assert len(grids) >= 2, grids
    for name, grid in grids.items():
        assert max(grid[1:]) <= GRID_AXIS_LIMIT and grid[0] < 2**31, (name, grid)  # axis 0 takes 2**31 - 1
        assert grid[1:] in ((32, 2048), (8, 2048), (1, 2048)), (name, grid)  # heads (1: a mask plan's for all)


SLOPES = torch.tensor([0.5, 0.25])


def _relative_bias(score, b, h, q_idx, kv_idx):
    return score + SLOPES[h] * (kv_idx - q_idx)


class _WithSink(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.sink = torch.nn.Parameter(torch.zeros(2))
        self.attn = ag.compile(ag.AttentionSpec(score_mod=_relative_bias, normalization=ag.norms.Softmax(
            sink=self.sink), mask_mod=ag.masks.sliding_window(6) & ag.masks.causal))
        self.linear = ag.compile(ag.LinearAttentionSpec(decay=0.9))

    def forward(self, q):
        return self.attn(q, q, q) + self.linear(q, q, q)


def test_a_model_holding_compiled_attention_saves_whole(tmp_path):
    """torch.save(model) pickles a CompiledAttention as its spec (module-level mods, library masks), compiled
    again on load; the loaded spec's learnable sink is the loaded module's parameter, as it was before."""
    model = _WithSink()
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    q = torch.randn(1, 2, 12, 8)
    torch.testing.assert_close(loaded(q), model(q), atol=0, rtol=0)
    assert loaded.attn.spec.normalization.sink is loaded.sink
    loaded(q).sum().backward()
    assert loaded.sink.grad is not None and torch.all(loaded.sink.grad != 0)


def test_a_deep_copied_model_reads_its_own_buffers():
    """deepcopy copies what a CompiledAttention holds (unlike pickling, which recompiles the spec): a
    buffer its score_mod reads through a closure over the module is the copy's in the copy."""
    class Biased(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("slopes", torch.tensor([0.5, 0.25]))
            self.attn = ag.compile(ag.AttentionSpec(score_mod=lambda s, b, h, q, k: s + self.slopes[h] * (k - q),
                                                    mask_mod=ag.masks.causal))

        def forward(self, q):
            return self.attn(q, q, q)

    model, q = Biased(), torch.randn(1, 2, 12, 8)
    before = model(q)
    copied = copy.deepcopy(model)
    copied.slopes.mul_(4)
    assert torch.equal(model(q), before) and not torch.equal(copied(q), before)
