"""Neighborhood attention over an image's tokens (NATTEN): each pixel attends to a 5 x 5 window.

    query (y, x) sees key (y', x')  iff  (y', x') lies in the 5 x 5 window around (y, x), shifted
    inward at the borders so that every window holds 25 keys

Hassani et al., "Neighborhood Attention Transformer" (2023, arXiv:2204.07143), on a 5 x 9 grid of
tokens in row-major order (45 tokens).
"""

import attngen as ag

SPEC = ag.AttentionSpec(mask_mod=ag.masks.neighborhood_2d(5, 9, kernel=5))
