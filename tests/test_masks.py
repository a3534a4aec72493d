"""The mask library: each mask's pattern, and kernels with it against float64."""

import itertools
import pickle

import pytest
import torch

import attngen as ag
from attngen.reference import scores
from checks import check_variant
from variants import Case, Variant

masks = ag.masks
LENGTHS = torch.tensor([20, 7])
LIBRARY = {
    "chunked": masks.chunked(8),
    "block_causal": masks.block_causal(6),
    "dilated_sliding_window": masks.dilated_sliding_window(4, 3),
    "strided": masks.strided(5),
    "global_plus_window": masks.global_tokens(3) | masks.sliding_window(4),
    "padding": masks.padding(LENGTHS),
    "prefix_lm_per_batch": masks.prefix_lm(torch.tensor([5, 12])),
    "neighborhood_2d": masks.neighborhood_2d(5, 7, 3),
    "neighborhood_2d_dilated": masks.neighborhood_2d(6, 6, 3, dilation=2),
    "neighborhood_3d": masks.neighborhood_3d(3, 3, 4, 3),
    "not_chunked_and_causal": ~masks.chunked(8) & masks.causal,
}


def keep_matrix(mask, length=35, batch=1):
    q = torch.zeros(batch, 1, length, 1)
    return scores(q, q, ag.AttentionSpec(mask_mod=mask))[1][:, 0]


@pytest.mark.parametrize("name", LIBRARY)
def test_library_mask_matches_reference(name):
    mask = LIBRARY[name]
    check_variant(Variant(name, lambda case, gen: {}, lambda c: ag.AttentionSpec(mask_mod=mask)),
                  Case(2, 2, 1, 36, 36, 16, 16))


def _natten_window(position, size, kernel, dilation):
    """Brute force: the kernel positions of ``position``'s dilation group nearest to it, shifted inside."""
    group = [p for p in range(size) if p % dilation == position % dilation]
    index = group.index(position)
    start = max(0, min(index - kernel // 2, len(group) - kernel))
    return set(group[start:start + kernel])


@pytest.mark.parametrize("name", LIBRARY)
def test_library_masks_pickle_as_the_calls_that_made_them(name):
    """A model holding a mask pickles (torch.save of a whole module): each mask comes back as its
    factory's call or its combinators', with the same name and pattern."""
    mask = LIBRARY[name]
    loaded = pickle.loads(pickle.dumps(mask))
    assert loaded.name == mask.name and loaded.fn is not mask.fn
    assert torch.equal(keep_matrix(loaded, batch=2), keep_matrix(mask, batch=2))


@pytest.mark.parametrize("height, width, kernel, dilation", [(5, 7, 3, 1), (6, 6, 3, 2), (4, 9, 5, 1)])
def test_neighborhood_2d_is_natten_with_clamped_windows(height, width, kernel, dilation):
    keep = keep_matrix(masks.neighborhood_2d(height, width, kernel, dilation), height * width)[0]
    for q, k in itertools.product(range(height * width), repeat=2):
        expected = (k // width in _natten_window(q // width, height, kernel, dilation)
                    and k % width in _natten_window(q % width, width, kernel, dilation))
        assert bool(keep[q, k]) == expected, (q, k)


def test_patterns():
    q, k = torch.arange(35)[:, None], torch.arange(35)[None, :]
    assert torch.equal(keep_matrix(masks.chunked(8))[0], q // 8 == k // 8)
    assert torch.equal(keep_matrix(masks.block_causal(6))[0], k // 6 <= q // 6)
    dilated = keep_matrix(masks.dilated_sliding_window(4, 3))[0]
    assert torch.equal(dilated.sum(-1)[9:], torch.full((26,), 4)) and not dilated[10, 9]
    assert torch.equal(keep_matrix(masks.strided(5))[0], (q >= k) & ((q - k) % 5 == 0))
    padded = keep_matrix(masks.padding(LENGTHS), batch=2)
    assert padded[0].sum(-1).eq(20).all() and padded[1].sum(-1).eq(7).all()
    assert torch.equal(keep_matrix(masks.padding(7), batch=2),
                       keep_matrix(masks.padding(torch.tensor([7, 7])), batch=2))
    assert keep_matrix(masks.neighborhood_3d(3, 3, 4, 3), 36)[0].sum(-1).eq(27).all()


@pytest.mark.parametrize("make", [lambda: masks.chunked(0), lambda: masks.neighborhood_2d(4, 4, -1),
                                  lambda: masks.strided(2.5)])
def test_bad_sizes(make):
    with pytest.raises(ValueError, match="must be a positive int"):
        make()


@pytest.mark.parametrize("make, message", [
    (lambda: masks.padding(torch.tensor([20.0, 7.0])), "padding: lengths must be an integer tensor [B] or an int, "
                                                       "got a torch.float32 tensor of shape (2,)"),
    (lambda: masks.padding([20, 7]), "padding: lengths must be an integer tensor [B] or an int, got list"),
    (lambda: masks.padding(-1), "padding: lengths must be an int >= 0, got -1"),
    (lambda: masks.prefix_lm(torch.tensor([[5, 12]])), "prefix_lm: prefix must be an integer tensor [B] or an int, "
                                                       "got a torch.int64 tensor of shape (1, 2)"),
    (lambda: masks.document([0, 0, 1]), "document: doc_ids must be an integer tensor [B, L] or [L], got list"),
    (lambda: masks.document(torch.zeros(2, 2, 16, dtype=torch.long)), "document: doc_ids must be an integer tensor "
                                                                      "[B, L] or [L], got a torch.int64 tensor"),
    (lambda: masks.document(torch.ones(2, 16, dtype=torch.bool)), "document: doc_ids must be an integer tensor"),
])
def test_masks_of_tensors_name_the_tensor_they_want(make, message):
    """Before: a list failed in doc_ids.dim(), a per-batch tensor of the wrong rank failed while tracing
    ('mask_mod: a vector of 2 entries is used as a value'), padding(7) too ('int' object is not
    subscriptable, at <unknown location>), and float lengths were taken."""
    with pytest.raises(ValueError) as refused:
        make()
    assert message in str(refused.value)


def test_static_masks_get_closed_form_loop_ranges():
    for mask in (masks.chunked(64), masks.block_causal(32), masks.padding(LENGTHS)):
        source = ag.compile(ag.AttentionSpec(mask_mod=mask)).source
        segments = source.split("def kv_segments")[1].split("return")[0]
        end = next(line for line in segments.splitlines() if line.strip().startswith("kv_end ="))
        assert "LK" in end and end.strip() != "kv_end = LK", segments
