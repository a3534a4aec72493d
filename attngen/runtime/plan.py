"""The kernels' block-sparsity plan, evaluated on the host for inspection.

The generated kernels decide per program which tiles to visit from the mask
plan outputs of the kernel graph (loop segments, ``block_live``,
``block_partial``). Here the same outputs are evaluated with torch over every
tile at once, from the same per-tile summaries the launcher computes, so the
counts describe what the kernels do.
"""

from __future__ import annotations

from types import ModuleType

import torch

from ..codegen.printer import TritonPrinter
from ..ir.evaluate import evaluate
from ..ir.graph import Graph


def _grid(count: int, block: int, length: int, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tile numbers, first and last positions of ``count`` tiles, laid out along ``dim`` of 4."""
    shape = [1, 1, 1, 1]
    shape[dim] = count
    tile = torch.arange(count).view(shape)
    lo = tile * block
    return tile, lo, torch.clamp(lo + block, max=length) - 1


def tile_states(graph: Graph, kernels: ModuleType, captures: list[torch.Tensor], batch: int, heads: int,
                q_len: int, kv_len: int, config: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """``(visited, full)``: bool ``[batch, heads, q tiles, kv tiles]``, which tiles the forward pass
    computes and which of those it runs without mask_mod; ``captures`` as the kernels take them."""
    block_m, block_n = config["BLOCK_M"], config["BLOCK_N"]
    n_q, n_kv = -(-q_len // block_m), -(-kv_len // block_n)
    shape = (batch, heads, n_q, n_kv)
    if layout(graph, "kv") == "full":
        everything = torch.ones(shape, dtype=torch.bool)
        return everything, everything
    q_tile, q_lo, q_hi = _grid(n_q, block_m, q_len, 2)
    kv_tile, kv_lo, kv_hi = _grid(n_kv, block_n, kv_len, 3)
    env = {"b": torch.arange(batch).view(-1, 1, 1, 1), "h": torch.arange(heads).view(1, -1, 1, 1),
           "q_tile": q_tile, "q_lo": q_lo, "q_hi": q_hi, "kv_tile": kv_tile, "kv_lo": kv_lo, "kv_hi": kv_hi,
           "LQ": q_len, "LK": kv_len, "BLOCK_M": block_m, "BLOCK_N": block_n}
    captures = [c.cpu() for c in captures]
    tiles = [t.long() for t in kernels.tile_summaries(captures, q_len, kv_len, config)]

    def value(name: str) -> torch.Tensor:
        return torch.broadcast_to(evaluate(graph, name, env, tiles, captures), shape)

    in_range = (kv_lo >= value("kv_start")) & (kv_lo < value("kv_end"))
    whole = (kv_lo >= value("kv_split0")) & (kv_lo < value("kv_split1")) if layout(graph, "kv") == "split" \
        else torch.zeros(shape, dtype=torch.bool)
    checked = in_range & ~whole & value("block_live")
    return whole | checked, whole | (checked & ~value("block_partial"))


def block_counts(visited: torch.Tensor, full: torch.Tensor) -> dict[str, int]:
    """``{"total", "empty", "full", "partial"}`` from :func:`tile_states`."""
    total, computed, whole = visited.numel(), int(visited.sum()), int(full.sum())
    return {"total": total, "empty": total - computed, "full": whole, "partial": computed - whole}


_LAYOUTS = {
    "full": "every tile, no mask evaluated (mask_mod is always True)",
    "split": "{a} tiles in the closed-form range [{a}_start, {a}_end); those in [{a}_split0, {a}_split1) are "
             "kept whole and run without mask_mod or a branch, the others are checked one by one",
    "masked": "{a} tiles in the closed-form range [{a}_start, {a}_end), each checked with block_state by a "
              "first kernel that lists the live ones, which the loop then visits without a branch (it "
              "pipelines)",
}


def layout(graph: Graph, axis: str) -> str:
    """How the kernels loop over ``axis`` tiles: "full", "split" or "masked" (see codegen.render.tile_loop)."""
    if graph.is_const(graph.outputs["mask"], True):
        return "full"
    return "split" if f"{axis}_split0" in graph.outputs else "masked"


def _plan_depends(graph: Graph, outputs: tuple[str, ...], inputs: tuple[str, ...]) -> bool:
    """Whether a plan output named with a prefix in ``outputs`` depends on one of ``inputs``."""
    plan = [n for name, n in graph.outputs.items() if name.startswith(outputs)]
    return any(graph.depends_on(n, name) for n in plan for name in inputs)


def depends_on_head(graph: Graph) -> bool:
    """Whether the mask plan (loop ranges and block states, either axis) differs between query heads:
    if not, one tile list per batch entry serves every head."""
    return _plan_depends(graph, ("kv_", "q_", "block_"), ("h",))


def same_for_all_heads(graph: Graph) -> bool:
    """Whether the forward's kv loop plan depends on neither the query head nor the q tile's number,
    so one program may hold rows of several query heads (GQA packing when decoding)."""
    return not _plan_depends(graph, ("kv_", "block_"), ("h", "q_tile"))


def describe(graph: Graph) -> list[str]:
    """The mask plan of a kernel graph in words (``attngen show``)."""
    lines = [f"forward and dQ: per q tile, {_LAYOUTS[layout(graph, 'kv')].format(a='kv')}",
             f"dK/dV: per kv tile, {_LAYOUTS[layout(graph, 'q')].format(a='q')}"]
    if layout(graph, "kv") == "full":
        return lines
    lines.append("block_state, per checked tile (q_lo..q_hi x kv_lo..kv_hi):")
    statements, _ = TritonPrinter(graph).statements({"live": "block_live", "masked": "block_partial"})
    lines += [f"  {line}" for line in statements]
    lines += [f"  tile{j}: {t.describe()}, computed by the launcher for its tile sizes" for j, t in
              enumerate(graph.tiles)]
    mask = graph.outputs["mask"]
    per_element = sorted({graph.node(n)["capture"] for n in graph.order([mask]) if graph.op(n) == "load"
                          and (graph.depends_on(n, "q_idx") or graph.depends_on(n, "kv_idx"))}
                         - {t.capture for t in graph.tiles})
    if per_element:
        names = ", ".join(f"capture{c}" for c in per_element)
        lines.append(f"no tile summary applies to {names} (a float, or indexed by more than q_idx // c or "
                     "kv_idx // c): tiles are not skipped on its account; the mask is evaluated per element")
    return lines

