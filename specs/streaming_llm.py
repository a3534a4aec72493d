"""StreamingLLM: attention sinks plus a sliding window, causal.

    query i sees key j  iff  j <= i and (j < 4 or i - j < 16)

Xiao et al., "Efficient Streaming Language Models with Attention Sinks" (2023, arXiv:2309.17453):
keeping the first 4 tokens' keys next to a recent window keeps perplexity stable past the
training length (there with windows of hundreds to thousands of keys; 16 here, so that short test
sequences use both parts). The mask plan visits the sink tiles and the window's band only.
"""

import attngen as ag

SINKS, WINDOW = 4, 16
SINK_KEYS = ag.masks.Mask(lambda b, h, q_idx, kv_idx: kv_idx < SINKS, f"sinks({SINKS})")
SPEC = ag.AttentionSpec(mask_mod=ag.masks.causal & (SINK_KEYS | ag.masks.sliding_window(WINDOW - 1)))
