"""Expert merging: how experts are grouped, aligned and combined.

Grouping (each merging method's :meth:`~edgeprune.pruning.methods.MethodConfig.clusters`):

* UNCURL (Sarkar et al. 2024): spectral clustering of router-logit affinities, below;
* HC-SMoE (Chen et al. 2025, arXiv 2410.08589): agglomerative clustering, average linkage, of the experts'
  mean outputs over calibration tokens (:func:`hc_clusters`);
* M-SMoE (Li et al. 2024, arXiv 2310.01334): the k most used experts are the dominant ones; every other expert
  joins the dominant expert whose router-logit column it is most similar to (:func:`dominant_clusters`).

Combining (:data:`MERGE_RULES`, the plan's ``merge_rule``): ``average`` (aligned, usage-weighted: UNCURL, M-SMoE),
``average-unaligned`` (usage-weighted, no permutation: HC-SMoE's frequency-weighted merge), ``ties`` (aligned, then
TIES-Merging, Yadav et al. 2023, arXiv 2306.01708: :func:`ties_merge`). Every rule returns an expert itself when
its group has one member or identical members.

UNCURL (Sarkar et al. 2024, arXiv 2409.01483), section 3:

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
    return groups_from_labels(labels, stats.counts)


def groups_from_labels(labels, counts) -> list[list[tuple[int, float]]]:
    """Groups from cluster labels: members by usage (the most used, the reference, first), weights = usage shares
    within the group (uniform where the group saw no token); groups ordered by their lowest expert id."""
    labels = np.asarray(labels)
    usage = np.asarray(counts, dtype=float)
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


def hc_clusters(stats: LayerStats, d: int) -> list[list[tuple[int, float]]]:
    """HC-SMoE: the experts' mean outputs over the sampled calibration tokens (every expert on the same tokens,
    ``LayerStats.out_sum``), agglomerative clustering with average linkage on their Euclidean distances, the tree
    cut into ``d`` clusters (``scipy.cluster.hierarchy``)."""
    from scipy.cluster.hierarchy import cut_tree, linkage

    z = len(stats.counts)
    if d >= z:
        return groups_from_labels(np.arange(z), stats.counts)
    if stats.out_sum is None or not stats.out_rows:
        raise ValueError("hc-smoe needs the experts' outputs on calibration tokens (LayerStats.out_sum)")
    means = stats.out_sum / stats.out_rows
    labels = cut_tree(linkage(means, method="average", metric="euclidean"), n_clusters=d).reshape(-1)
    return groups_from_labels(labels, stats.counts)


def dominant_clusters(stats: LayerStats, d: int) -> list[list[tuple[int, float]]]:
    """M-SMoE: the ``d`` most used experts lead; each other expert joins the leader whose router-logit column is the
    most similar (:func:`logit_affinity`, ties to the lower id)."""
    z = len(stats.counts)
    order = sorted(range(z), key=lambda e: (-stats.counts[e], e))
    leaders = sorted(order[:d])
    affinity = logit_affinity(stats.logit_matrix()) if stats.logits else np.eye(z)
    labels = np.empty(z, dtype=int)
    for e in range(z):
        labels[e] = e if e in leaders else max(leaders, key=lambda l: (affinity[e, l], -l))
    return groups_from_labels(labels, stats.counts)


MERGE_RULES = ("average", "average-unaligned", "ties")


def ties_merge(aligned: list[dict[str, torch.Tensor]], weights: list[float], density: float = 0.2) -> dict[str, torch.Tensor]:
    """TIES-Merging (Yadav et al. 2023) of aligned experts with the group's reference (most used, first) as the base:
    experts share no pretrained base in general, and around the mean the deltas would cancel by construction.
    tau_e = W_e - W_ref for the other members, each trimmed to its ``density`` largest magnitudes; per entry the sign
    of sum_e f_e tau_e is elected; delta = the f-weighted mean of the trimmed entries that agree with it; the result
    is W_ref + (1 - f_ref) delta (f: usage shares in the group), so rarely used members move the reference little.
    Identical experts have tau = 0 and give the expert back."""
    total = float(sum(weights))
    share = torch.tensor([w / total for w in weights], dtype=torch.float64)
    out = {}
    for k, ref in aligned[0].items():
        base = ref.double()
        taus = []
        for e in aligned[1:]:
            tau = e[k].double() - base
            keep = max(1, int(round(density * tau.numel())))
            cut = tau.abs().reshape(-1).kthvalue(tau.numel() - keep + 1).values if keep < tau.numel() else 0.0
            taus.append(torch.where(tau.abs() >= cut, tau, torch.zeros_like(tau)))
        stack = torch.stack(taus)
        w = share[1:].reshape(-1, *([1] * base.ndim))
        sign = torch.sign((w * stack).sum(0))
        agree = ((torch.sign(stack) == sign) & (stack != 0)).double() * w
        delta = (agree * stack).sum(0) / agree.sum(0).clamp_min(1e-30)
        out[k] = (base + (1 - share[0]) * delta).to(ref.dtype)
    return out


def merge_experts(experts: list[dict[str, torch.Tensor]], weights: list[float],
                  roles: dict[str, str], rule: str = "average") -> dict[str, torch.Tensor]:
    """Combine a group's experts by ``rule`` (:data:`MERGE_RULES`), aligned to the first (the reference) unless
    the rule is ``average-unaligned``."""
    if len(experts) == 1:
        return {k: v.clone() for k, v in experts[0].items()}
    ref = experts[0]
    aligned = [ref] + [e if rule == "average-unaligned" else align_to(ref, e, roles) for e in experts[1:]]
    if rule == "ties":
        return ties_merge(aligned, weights)
    total = float(sum(weights))
    return {k: sum(w / total * e[k].double() for w, e in zip(weights, aligned)).to(ref[k].dtype) for k in ref}
