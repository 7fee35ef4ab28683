"""Expert merging, UNCURL (Sarkar et al. 2024, arXiv 2409.01483), section 3:

1. router logits H (tokens x Z) on task data; S_ij = cosine(H_:,i, H_:,j); S = (1 + S) / 2 in [0, 1];
2. spectral clustering of the affinity S into D clusters (graph-Laplacian eigenvectors, then k-means:
   scikit-learn's ``SpectralClustering(affinity="precomputed")``);
3. in each cluster the most used expert is the reference; every other expert is aligned to it by the
   permutation of hidden units that maximises sum_i <W_in^ref_i, W_in^e_pi(i)> + <W_out^ref_:,i, W_out^e_:,pi(i)>
   (Hungarian matching, ``scipy.optimize.linear_sum_assignment``), as FFN hidden units are permutation
   symmetric;
4. merge: average of the aligned experts weighted by their usage frequency.
"""
from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from edgeprune.models.adapter import unit_axis
from edgeprune.pruning.calibration import LayerStats


def logit_affinity(logits: np.ndarray) -> np.ndarray:
    """S = (1 + cos(H_:,i, H_:,j)) / 2 over the columns of the router logits H."""
    h = logits - logits.mean(0, keepdims=True) if logits.shape[0] > 1 else logits
    norms = np.linalg.norm(h, axis=0)
    norms[norms == 0] = 1.0
    cos = (h.T @ h) / np.outer(norms, norms)
    return (1.0 + np.clip(cos, -1.0, 1.0)) / 2.0


def uncurl_clusters(stats: LayerStats, d: int, seed: int = 0) -> list[list[tuple[int, float]]]:
    """D groups of ``[expert, weight]``, the reference (most used) first, weights = usage within the group."""
    z = len(stats.counts)
    if d >= z:
        labels = np.arange(z)
    elif d == 1:
        labels = np.zeros(z, dtype=int)
    else:
        from sklearn.cluster import SpectralClustering

        affinity = logit_affinity(stats.logit_matrix())
        labels = SpectralClustering(n_clusters=d, affinity="precomputed", random_state=seed,
                                    assign_labels="kmeans").fit_predict(affinity)
    usage = stats.counts.astype(float)
    groups = []
    for c in sorted(set(labels.tolist()), key=lambda c: min(np.flatnonzero(labels == c))):
        members = sorted(np.flatnonzero(labels == c).tolist(), key=lambda e: (-usage[e], e))
        w = usage[members]
        w = w / w.sum() if w.sum() > 0 else np.full(len(members), 1.0 / len(members))
        groups.append([(int(e), round(float(x), 6)) for e, x in zip(members, w)])
    return groups


def align_to(ref: dict[str, torch.Tensor], other: dict[str, torch.Tensor], roles: dict[str, str]) -> dict[str, torch.Tensor]:
    """Permute the hidden units of expert ``other`` to match ``ref``: the permutation maximising
    sum over input projections of <W^ref_i, W^e_pi(i)> + sum over output projections of <W^ref_:,i, W^e_:,pi(i)>
    (gate and up of a gated MLP both count as input projections)."""
    sim = 0
    for name, role in roles.items():
        if name not in ref:
            continue
        if role == "in":
            sim = sim + ref[name].double() @ other[name].double().T
        elif role == "out":
            sim = sim + ref[name].double().T @ other[name].double()
    _, perm = linear_sum_assignment(sim.numpy(), maximize=True)
    perm = torch.from_numpy(perm)
    out = {}
    for name, t in other.items():
        axis = unit_axis(roles[name])
        out[name] = t if axis is None else t.index_select(axis, perm)
    return out


def merge_experts(experts: list[dict[str, torch.Tensor]], weights: list[float],
                  roles: dict[str, str]) -> dict[str, torch.Tensor]:
    """Usage-weighted average of experts aligned to the first (the reference)."""
    if len(experts) == 1:
        return {k: v.clone() for k, v in experts[0].items()}
    ref = experts[0]
    aligned = [ref] + [align_to(ref, e, roles) for e in experts[1:]]
    total = float(sum(weights))
    return {k: sum(w / total * e[k].double() for w, e in zip(weights, aligned)).to(ref[k].dtype) for k in ref}
