"""q, k and v at an attention call's entry, with torch alone: their checks, autocast's casts, a KV
cache's lengths and offsets, a paged cache's pages, packed sequences, dropout and the per-head
parameters. The source of these is also rendered into the kernel modules, whose entry point, exported,
treats its inputs the same way (refusing the same mistakes in the same words)."""

import functools
import numbers

import torch
from torch.utils.weak import WeakIdKeyDictionary

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 1024  # attention; above 256 (MLA's 576 / 512) the kernels take small tiles
LINEAR_MAX_HEAD_DIM = 256  # linear attention keeps a [Dqk, Dv] state in each program
GRID_AXIS_LIMIT = 65535  # programs along a CUDA launch grid's axes 1 and 2, the kernels' heads and batch entries
_KEPT_EXTREMES = WeakIdKeyDictionary()  # tensor -> ((its version, box), (least, greatest)): see kept_extremes


def check_qkv(q, k, v, dtypes=None, max_head_dim=None):
    """Validate q [B,Hq,Lq,Dqk], k [B,Hkv,Lk,Dqk], v [B,Hkv,Lk,Dv]; return (B, Hq, Hkv, Lq, Lk, Dqk, Dv).
    ``dtypes``: the floating dtypes accepted (None: any); ``max_head_dim``: the largest head dims taken."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have 4 dimensions [batch, heads, seq_len, head_dim], "
                             f"got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if dtypes is not None and t.dtype not in dtypes:
            raise TypeError(f"{name} has dtype {t.dtype}; the kernels support "
                            f"{', '.join(str(d) for d in dtypes)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must have the same dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on the same device, got {q.device}, {k.device}, {v.device}")
    B, Hq, Lq, Dqk = q.shape
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(f"batch sizes differ: q {B}, k {k.shape[0]}, v {v.shape[0]}")
    if k.shape[1] != v.shape[1]:
        raise ValueError(f"k and v must have the same number of heads, got {k.shape[1]} and {v.shape[1]}")
    Hkv = k.shape[1]
    if Hkv == 0:
        raise ValueError(f"k and v must have at least one head, got shape {tuple(k.shape)}")
    if Hq % Hkv != 0:
        raise ValueError(f"the number of query heads ({Hq}) must be a multiple of the number of "
                         f"key/value heads ({Hkv}) (grouped-query attention)")
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"k and v must have the same sequence length, got {k.shape[2]} and {v.shape[2]}")
    if k.shape[3] != Dqk:
        raise ValueError(f"q and k must have the same head dim, got {Dqk} and {k.shape[3]}")
    if max_head_dim is not None:
        for name, d in (("q/k head dim", Dqk), ("v head dim", v.shape[3])):
            if not 1 <= d <= max_head_dim:
                raise ValueError(f"{name} must be between 1 and {max_head_dim}, got {d}")
    return B, Hq, Hkv, Lq, k.shape[2], Dqk, v.shape[3]


def under_autocast(call):
    """``call(q, k, v, ...)`` as torch's SDPA and FlexAttention run under ``torch.autocast``: where autocast
    is on for q's device, q, k and v are cast to its dtype (float64 aside) and the call runs under
    ``torch.autocast(device, enabled=False)`` (so its own float32 products stay float32); elsewhere it
    runs on q, k, v unchanged."""

    @functools.wraps(call)
    def cast(q, k, v, *args, **kwargs):
        device = q.device.type if isinstance(q, torch.Tensor) else None
        if device is None or not torch.amp.is_autocast_available(device) or not torch.is_autocast_enabled(device):
            return call(q, k, v, *args, **kwargs)
        dtype = torch.get_autocast_dtype(device)
        q, k, v = (t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64
                   else t for t in (q, k, v))
        with torch.autocast(device, enabled=False):
            return call(q, k, v, *args, **kwargs)
    return cast


def check_device(device, interpreted=None):
    """Refuse q's ``device`` where the kernels cannot run: they run on CUDA GPUs, and on CPU tensors through
    Triton's interpreter (``interpreted``: whether a module's kernels were imported that way; None: attngen
    picks per call)."""
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"q is on {device}; attngen's kernels run on CUDA GPUs and (interpreted) on CPU")
    if device.type == "cpu" and interpreted is False:
        raise ValueError("q is on the CPU, but this module's kernels were imported compiled, for a GPU: set "
                         "TRITON_INTERPRET=1 before importing triton to run them on CPU tensors (Triton's "
                         "interpreter), or move q, k and v to a CUDA device")


def check_launch(batch, q_heads, qk_dim, differential):
    """Refuse a call the attention kernels cannot launch: more than GRID_AXIS_LIMIT batch entries or query
    heads, or, for ``differential`` attention, an odd head dim of q and k (they split in halves)."""
    if max(batch, q_heads) > GRID_AXIS_LIMIT:
        raise ValueError(f"a call takes at most {GRID_AXIS_LIMIT} batch entries and {GRID_AXIS_LIMIT} query heads "
                         f"(a CUDA launch grid's programs along an axis), got a batch of {batch} and "
                         f"{q_heads} query heads: split the call")
    if differential and qk_dim % 2:
        raise ValueError(f"differential attention splits q and k in halves: their head dim must be even, "
                         f"got {qk_dim}")


def per_head_tensor(name, value, heads, device):
    """A per-head parameter (a number, or a floating-point tensor of one entry per query head or of one
    value) as the contiguous float32 [heads] tensor the kernels read (autograd-connected)."""
    if not isinstance(value, torch.Tensor):
        return torch.full((heads,), float(value), device=device)
    if value.device != device:
        raise ValueError(f"{name} is on {value.device} but q is on {device}")
    if not value.is_floating_point() or value.dim() > 1:
        raise TypeError(f"{name} must be a floating-point tensor of one entry per query head ({heads}), got a "
                        f"{value.dtype} tensor of shape {tuple(value.shape)}")
    if value.dim() == 1 and value.shape[0] != heads:
        raise ValueError(f"{name} has {value.shape[0]} entries; expected one per query head ({heads})")
    return value.float().expand(heads).contiguous()


def check_entmax_alpha(name, alpha):
    """Refuse an entmax ``alpha`` [heads] outside (1, 2], where it is on the CPU; a GPU call does not
    synchronize to read it (a learnable alpha changes every step): the kernels give a head whose alpha is
    out of range NaN outputs and a NaN alpha gradient."""
    if alpha.device.type == "cpu" and values_checkable(alpha) and not bool(((alpha > 1) & (alpha <= 2)).all()):
        raise ValueError(f"{name} must be in (1, 2] for every head, got {alpha.tolist()}")


def values_checkable(t):
    """Whether a call may read ``t``'s values to check them: not while torch.compile traces (they
    are data there, and a check would break the graph) nor while a CUDA graph is being captured
    (reading them would synchronize the device). The kernels stay within the tensors either way."""
    return not torch.compiler.is_compiling() and not (t.is_cuda and torch.cuda.is_current_stream_capturing())


def least_and_greatest(t):
    """[the least, the greatest] value of the non-empty tensor ``t``: one read on a GPU."""
    return torch.stack(torch.aminmax(t)).tolist()


def kept_extremes(t, box=None):
    """(the least, the greatest) value of ``t`` over ``box`` (a (first, last) index per dimension; None: all
    of it), read once per version of ``t``: the calls of a model's layers that share a tensor (kv_lens, a
    captured table) wait for a GPU once while in-place torch operations leave it alone (an inference
    tensor, which has no version counter, is read every time)."""
    def read():
        return tuple(least_and_greatest(t if box is None else t[tuple(slice(lo, hi + 1) for lo, hi in box)]))
    if t.is_inference():
        return read()
    key = (t._version, box)
    known = _KEPT_EXTREMES.get(t)
    if known is None or known[0] != key:
        known = key, read()
        _KEPT_EXTREMES[t] = known
    return known[1]


def per_batch_integers(name, value, batch, device):
    """``value`` (an int or a 1-d integer tensor with one entry per batch entry) as an int32 tensor
    [batch] on ``device``."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return torch.full((batch,), int(value), dtype=torch.int32, device=device)
    if not isinstance(value, torch.Tensor) or value.dim() != 1 or value.is_floating_point() \
            or value.dtype == torch.bool or value.shape[0] != batch:
        shown = f"a {value.dtype} tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) \
            else repr(value)
        raise ValueError(f"{name} must be an int or a 1-d integer tensor with one entry per batch entry "
                         f"({batch}), got {shown}")
    if value.device != device:
        raise ValueError(f"{name} is on {value.device} but q is on {device}; move it to {device}")
    return value.to(torch.int32)


def cache_positions(kv_lens, q_offset, batch, q_len, kv_len, device):
    """(kv_lens, q_offset) of a call on KV caches of ``kv_len`` keys, as int32 tensors [batch]: ``kv_lens``
    (an int or [batch] ints; None: the caches are full) between 0 and kv_len; ``q_offset`` (likewise; None:
    kv_lens - q_len, the queries being the last tokens)."""
    lens = per_batch_integers("kv_lens", kv_len if kv_lens is None else kv_lens, batch, device)
    if isinstance(kv_lens, torch.Tensor):  # read once for every layer's call while it holds the same values
        extremes = kept_extremes(kv_lens) if values_checkable(kv_lens) and batch else []
    else:  # an int: checked without reading the device
        extremes = [] if kv_lens is None else [int(kv_lens)]
    if any(n < 0 or n > kv_len for n in extremes):
        raise ValueError(f"kv_lens must be between 0 and the cache length ({kv_len}), got {lens.tolist()}")
    offset = lens - q_len if q_offset is None else q_offset
    return lens, per_batch_integers("q_offset", offset, batch, device)


def paged_view(q, k, v, block_table, kv_lens):
    """A paged cache's pages k, v [num_pages, Hkv, page_size, D] seen as the caches [B, Hkv, max_pages *
    page_size, D] they hold (stride 0: to check their sizes, not to read), and block_table [B, max_pages]
    as int32; a paged call needs ``kv_lens``."""
    for name, t in (("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"with block_table, {name} must be pages [num_pages, kv_heads, page_size, head_dim], got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(f"k and v pages must have the same [num_pages, kv_heads, page_size], got {tuple(k.shape[:3])} "
                         f"and {tuple(v.shape[:3])}")
    if not isinstance(block_table, torch.Tensor) or block_table.dim() != 2 or block_table.is_floating_point() \
            or block_table.dtype == torch.bool or block_table.shape[0] != q.shape[0]:
        raise ValueError(f"block_table must be an integer tensor [batch ({q.shape[0]}), max_pages], got "
                         f"{block_table.dtype if isinstance(block_table, torch.Tensor) else type(block_table).__name__}"
                         f"{tuple(block_table.shape) if isinstance(block_table, torch.Tensor) else ''}")
    if kv_lens is None:
        raise ValueError("a paged cache (block_table) needs kv_lens, the number of keys of each batch entry")
    if block_table.device != q.device:
        raise ValueError(f"block_table is on {block_table.device} but q is on {q.device}; move it to {q.device}")
    length = block_table.shape[1] * k.shape[2]
    k_view, v_view = (t.as_strided((q.shape[0], t.shape[1], length, t.shape[3]), (0, 0, 0, 0)) for t in (k, v))
    return k_view, v_view, block_table.to(torch.int32)


def check_pages_in_range(table, kv_lens, page_size, num_pages):
    """Refuse a block table that, within each batch entry's ``kv_lens`` keys, names a page that is not
    there (where the values may be read: see values_checkable)."""
    if not values_checkable(table) or not table.numel():
        return
    needed = torch.arange(table.shape[1], device=table.device)[None, :] * page_size < kv_lens[:, None]
    # one read on a GPU; entries no row needs count as 0 for the least and -1 for the greatest, which pass
    least, greatest = torch.stack([torch.where(needed, table, 0).min(), torch.where(needed, table, -1).max()]).tolist()
    if least < 0 or greatest >= num_pages:
        raise ValueError(f"block_table refers to pages outside 0..{num_pages - 1} within kv_lens")


def jagged_at_length(t) -> bool:
    """Whether ``t`` is a jagged nested tensor [batch, heads, j, head_dim], ragged in its length only."""
    return isinstance(t, torch.Tensor) and t.is_nested and t.layout == torch.jagged and t.dim() == 4 \
        and [d for d, size in enumerate(t.shape) if not isinstance(size, int)] == [2]


def tensor_kind(t) -> str:
    """What ``t`` is, for an error message."""
    if not isinstance(t, torch.Tensor):
        return type(t).__name__
    if not t.is_nested:
        return f"a dense tensor of shape {tuple(t.shape)}"
    if t.layout != torch.jagged:
        return f"a {t.layout} nested tensor"
    return f"a jagged nested tensor of shape {tuple(t.shape)}"


@torch.compiler.disable  # torch.compile cannot trace the checks of a nested tensor's shape: a graph break
def jagged_view(q, k, v, cu_seqlens_q, cu_seqlens_k):
    """Jagged nested tensors ``[batch, heads, j, head_dim]`` (SDPA's layout for them) as the packed values
    and offsets of a cu_seqlens call: ``(cu_seqlens_q, cu_seqlens_k, q, k, v)``; see :func:`packed_view`."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not jagged_at_length(t):
            raise ValueError(f"with nested tensors, q, k and v must each be a jagged nested tensor [batch, heads, "
                             f"j, head_dim] (torch.nested.nested_tensor of [tokens, heads, head_dim] sequences, "
                             f"layout=torch.jagged, then .transpose(1, 2)); {name} is {tensor_kind(t)}")
    if cu_seqlens_q is not None or cu_seqlens_k is not None:
        raise ValueError("nested tensors carry their sequence lengths: pass no cu_seqlens_q / cu_seqlens_k")
    if k.offsets() is not v.offsets() and not torch.equal(k.offsets(), v.offsets()):
        raise ValueError(f"k and v must hold sequences of the same lengths, got offsets {k.offsets().tolist()} "
                         f"and {v.offsets().tolist()}")
    return q.offsets(), k.offsets(), *(t.transpose(1, 2).values() for t in (q, k, v))


def packed_output(out, nested_offsets=None):
    """The kernels' output [1, HQ, tokens, DV] on packed sequences as the call returns it: [tokens, HQ, DV], or
    a jagged nested tensor [batch, HQ, j, DV] where q came as one (``nested_offsets``: its offsets)."""
    out = out[0].transpose(0, 1)
    if nested_offsets is None:
        return out
    return torch.nested.nested_tensor_from_jagged(out, nested_offsets).transpose(1, 2)


def packed_view(q, k, v, cu_seqlens_q, cu_seqlens_k):
    """Sequences packed as q, k, v [tokens, heads, D] (``cu_seqlens_q`` / ``_k`` [batch + 1]: where each
    starts) as ``(positions, q, k, v)``: the per-token tensors of :func:`packed_positions`, and q, k, v seen
    as one batch entry [1, heads, tokens, D]."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise ValueError(f"with cu_seqlens, {name} must have 3 dimensions [tokens, heads, head_dim], got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if isinstance(cu, torch.Tensor) and cu.device != q.device:
            raise ValueError(f"{name} is on {cu.device} but q is on {q.device}; move it to {q.device}")
    positions = packed_positions(cu_seqlens_q, cu_seqlens_k, q.shape[0], k.shape[0])
    return positions, *(t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))


def packed_positions(cu_seqlens_q, cu_seqlens_k, total_q, total_k):
    """What the kernels read of packed sequences, from their cumulative lengths: each query's and key's
    sequence (``seq_q``, ``seq_k``), where each sequence starts (``start_q``, ``start_k``) and its number of
    keys (``len_k``), as int32 tensors."""
    cumulative = (("cu_seqlens_q", cu_seqlens_q, total_q), ("cu_seqlens_k", cu_seqlens_k, total_k))
    for name, cu, total in cumulative:
        if not isinstance(cu, torch.Tensor) or cu.dim() != 1 or cu.is_floating_point() or cu.numel() < 2:
            raise ValueError(f"{name} must be a 1-d integer tensor [batch + 1] of cumulative sequence lengths, "
                             f"got {cu if not isinstance(cu, torch.Tensor) else (cu.dtype, tuple(cu.shape))}")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must describe the same number of sequences, got "
                         f"{cu_seqlens_q.numel() - 1} and {cu_seqlens_k.numel() - 1}")
    if values_checkable(cu_seqlens_q):  # one read on a GPU, for both
        summaries = torch.stack([torch.stack([cu[0].long(), cu[-1].long(), (cu[1:] < cu[:-1]).sum()])
                                 for _, cu, _ in cumulative]).tolist()
        for (name, cu, total), (first, last, decreasing) in zip(cumulative, summaries):
            if first != 0 or last != total or decreasing:
                raise ValueError(f"{name} must start at 0, never decrease and end at the number of packed tokens "
                                 f"({total}), got {cu.tolist()}")

    def sequence_of_each_token(cu, total):
        lengths = (cu[1:] - cu[:-1]).long()
        return torch.repeat_interleave(torch.arange(cu.numel() - 1, device=cu.device, dtype=torch.int32), lengths,
                                       output_size=total)
    return {"seq_q": sequence_of_each_token(cu_seqlens_q, total_q),
            "seq_k": sequence_of_each_token(cu_seqlens_k, total_k),
            "start_q": cu_seqlens_q[:-1].to(torch.int32), "start_k": cu_seqlens_k[:-1].to(torch.int32),
            "len_k": (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).to(torch.int32)}


def dropout_rate(rate):
    """``rate`` as a float: a dropout probability, in [0, 1)."""
    if isinstance(rate, bool) or not isinstance(rate, numbers.Real) or not 0 <= rate < 1:
        raise ValueError(f"dropout_p must be a number in [0, 1), got {rate!r}")
    return float(rate)


def dropout_tensors(rate, seed, device):
    """A call's dropout probability ``rate`` and ``seed`` (an int; None: drawn from torch's generator, so
    reproducible under torch.manual_seed) as the kernels read them, on ``device``."""
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)))
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ValueError(f"seed must be an int, got {seed!r}")
    return {"dropout_seed": torch.tensor([int(seed)], dtype=torch.int64, device=device),
            "dropout_p": torch.tensor([dropout_rate(rate)], device=device)}
