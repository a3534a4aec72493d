"""Longformer: a symmetric sliding window plus global tokens that see and are seen by every position.

    query i sees key j  iff  |i - j| <= 8, or i < 2, or j < 2

Beltagy et al., "Longformer: The Long-Document Transformer" (2020, arXiv:2004.05150; windows of 256
keys on each side there, 8 here so that short test sequences use both parts) with the first 2
tokens global (a classifier token, a question).
"""

import attngen as ag

SPEC = ag.AttentionSpec(mask_mod=ag.masks.sliding_window(8, 8) | ag.masks.global_tokens(2))
