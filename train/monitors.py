"""Collapse monitors, computed from tensors the step already has (no extra forward).

Every method gets the embedding monitors, from the backbone embeddings of two
views of the same B images:

- ``embedding_std``: std over the batch of the L2-normalised embeddings, mean
  over dimensions, times sqrt(D): about 1 when spread, 0 when all images embed alike;
- ``effective_rank``: exp of the entropy of the normalised singular values of the
  centred embedding matrix (Roy & Vetterli 2007): 1 = everything on one line,
  up to min(B, D) when the batch fills the space (dimensional collapse shows here);
- ``alignment``: mean squared distance between the two views' normalised
  embeddings (0 = views agree; Wang & Isola 2020);
- ``uniformity``: log of the mean Gaussian potential ``exp(-2 ||a - b||^2)`` over
  pairs of images (0 = every image alike; -4 for a uniform sphere in high dimension).

The DINO family adds prototype monitors: every image going to one prototype
(the teacher's *batch-mean* distribution concentrates: KL to uniform grows to
log K) or uniform rows that teach nothing (row entropy near log K).

``collapse_verdict`` turns the last steps' monitors into the run summary's word.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.nn.functional as F

# A run whose embeddings spread less than this (std, rank) over its last steps is called collapsed.
COLLAPSED_STD = 0.05
COLLAPSED_RANK = 1.5


@torch.no_grad()
def teacher_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Mean per-row entropy (nats) of (B, K) teacher targets; log K = uniform rows."""
    p = probs.float()
    return -(p * torch.log(p.clamp_min(1e-12))).sum(-1).mean()


@torch.no_grad()
def marginal_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of the batch-mean of (B, K) teacher targets; near 0 = one prototype wins."""
    m = probs.float().mean(0)
    return -(m * torch.log(m.clamp_min(1e-12))).sum()


@torch.no_grad()
def kl_to_uniform(probs: torch.Tensor) -> torch.Tensor:
    """KL(batch-mean of (B, K) targets || uniform) = log K - marginal entropy."""
    return math.log(probs.shape[-1]) - marginal_entropy(probs)


@torch.no_grad()
def embedding_std(x: torch.Tensor) -> torch.Tensor:
    """(B, D) embeddings -> std over the batch of the normalised rows, mean over dims, times sqrt(D)."""
    if x.shape[0] < 2:
        return x.new_tensor(float("nan"))
    z = F.normalize(x.float(), dim=-1)
    return z.std(0).mean() * math.sqrt(z.shape[-1])


@torch.no_grad()
def effective_rank(x: torch.Tensor) -> torch.Tensor:
    """(B, D) embeddings -> exp(entropy of the normalised singular values of the centred matrix)."""
    if x.shape[0] < 2:
        return x.new_tensor(float("nan"))
    z = x.float() - x.float().mean(0, keepdim=True)
    if not bool(torch.isfinite(z).all()):  # a diverged step: the loss check reports it, not the SVD
        return x.new_tensor(float("nan"))
    s = torch.linalg.svdvals(z)
    if float(s.sum()) <= 0:
        return x.new_tensor(1.0)
    p = s / s.sum()
    return torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum())


@torch.no_grad()
def alignment(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean ||a_i - b_i||^2 of the normalised (B, D) embeddings of two views of the same images."""
    return (F.normalize(a.float(), dim=-1) - F.normalize(b.float(), dim=-1)).pow(2).sum(-1).mean()


@torch.no_grad()
def uniformity(x: torch.Tensor, t: float = 2.0) -> torch.Tensor:
    """log mean_{i != j} exp(-t ||x_i - x_j||^2) of the normalised (B, D) embeddings."""
    if x.shape[0] < 2:
        return x.new_tensor(float("nan"))
    z = F.normalize(x.float(), dim=-1)
    return torch.pdist(z).pow(2).mul(-t).exp().mean().log()


def embedding_monitors(a: torch.Tensor, b: torch.Tensor) -> dict[str, torch.Tensor]:
    """All embedding monitors from two views' (B, D) backbone embeddings."""
    return {"embedding_std": embedding_std(a), "effective_rank": effective_rank(a),
            "alignment": alignment(a, b), "uniformity": uniformity(a)}


def prototype_monitors(teacher_probs: torch.Tensor) -> dict[str, torch.Tensor]:
    """``teacher_entropy``, ``teacher_marginal_entropy`` and ``kl_to_uniform`` of (B, K) targets."""
    return {"teacher_entropy": teacher_entropy(teacher_probs),
            "teacher_marginal_entropy": marginal_entropy(teacher_probs),
            "kl_to_uniform": kl_to_uniform(teacher_probs)}


def collapse_verdict(records: Iterable[dict]) -> str | None:
    """``"collapsed (...)"`` when the last records' mean embedding std or effective rank is at the
    collapse floor, else None. ``records`` are per-step metrics dicts (the last ~10 are used)."""
    recs = [r for r in records if "embedding_std" in r][-10:]
    if not recs:
        return None
    std = sum(float(r["embedding_std"]) for r in recs) / len(recs)
    rank = sum(float(r.get("effective_rank", math.inf)) for r in recs) / len(recs)
    if std < COLLAPSED_STD or rank < COLLAPSED_RANK:
        return (f"collapsed: embedding_std {std:.3f} (floor {COLLAPSED_STD}), effective_rank {rank:.2f} "
                f"(floor {COLLAPSED_RANK}) over the last {len(recs)} steps")
    return None


__all__ = ["teacher_entropy", "marginal_entropy", "kl_to_uniform", "embedding_std", "effective_rank", "alignment",
           "uniformity", "embedding_monitors", "prototype_monitors", "collapse_verdict"]
