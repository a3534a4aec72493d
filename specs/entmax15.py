"""1.5-entmax attention (Peters, Niculae & Martins, 2019, "Sparse Sequence-to-Sequence Models";
Correia et al., 2019, "Adaptively Sparse Transformers").

    p_ij = [s_ij / 2 - tau_i]_+ ** 2,   tau_i such that sum_j p_ij = 1

between softmax (alpha -> 1) and sparsemax (alpha = 2): sparse, but smoother than sparsemax.
"""

import attngen as ag

SPEC = ag.AttentionSpec(normalization=ag.norms.Entmax(alpha=1.5))
