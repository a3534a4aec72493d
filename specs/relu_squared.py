"""ReLU-squared attention divided by the sequence length.

    p_ij = relu(s_ij)^2 / n,   o_i = sum_j p_ij v_j

Wortsman et al., "Replacing softmax with ReLU in Vision Transformers" (2023,
arXiv:2309.08586) show that relu(s)/n matches softmax when divided by the
sequence length n; the squared form is the common sharper variant.
"""

import attngen as ag

SPEC = ag.AttentionSpec(normalization=ag.norms.ReLU(power=2, normalize="length"))
