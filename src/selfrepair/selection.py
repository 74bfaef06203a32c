"""The top-k% selection of tokens, and a running top-k that streams over batches.

**The rule.** A head's top ``k`` instances are the ``k`` highest scores, and among equal scores the
lower *global* instance index (``row * (seq - 1) + pos`` over the whole token set) first
(:data:`TIE_RULE`). That is a total order on the instances, so the selection does not depend on
how the work was split: the batch size, the number of processes, the order in which partial
selections are merged, or a resume. (``torch.topk`` picks among tied values by their position in
the tensor it is given, which depends on all of those; a corpus with repeated text ties exactly.)
NaN counts as the highest score, as in ``torch.topk``.

**Streaming.** :func:`keep_top` merges new rows into a running selection (the sweep's first pass,
the neurons, the amplification), :func:`kth_best` is what a new row must reach to enter it and
:func:`entrants` the rows of a batch that can (what comes back from a remote request): each merges
exactly, so the streamed result equals the selection over every row at once.
"""

from __future__ import annotations

import torch

TIE_RULE = "score descending, then global instance index ascending"  # in the cache key of every selection


def ranked(score: torch.Tensor, index: torch.Tensor, k: int) -> torch.Tensor:
    """Positions along the last dimension of the ``k`` best of ``score [..., n]`` under
    :data:`TIE_RULE` (``index [..., n]``: each value's global instance index), best first."""
    k = min(k, score.shape[-1])
    by_index = index.expand_as(score).argsort(dim=-1, stable=True)
    by_score = score.gather(-1, by_index).sort(dim=-1, descending=True, stable=True).indices[..., :k]
    return by_index.gather(-1, by_score)


def take(rows: dict, idx: torch.Tensor) -> dict:
    """Rows ``idx [head, m]`` of each ``[head, n, ...]`` tensor of ``rows``, per head."""
    return {key: v.gather(1, idx.view(*idx.shape, *([1] * (v.dim() - 2))).expand(-1, -1, *v.shape[2:]))
            for key, v in rows.items()}


def keep_top(state: dict | None, new: dict, k: int) -> dict:
    """Merge ``new`` into ``state`` (dicts of ``[head, n, ...]`` with ``score`` and ``instance``),
    keeping per head the ``k`` best rows under :data:`TIE_RULE`. Neither argument is changed."""
    if state is not None:
        new = {key: torch.cat([state[key], new[key]], 1) for key in new}
    return take(new, ranked(new["score"], new["instance"], k))


def kth_best(state: dict | None, k: int, n_heads: int) -> torch.Tensor:
    """Per head the ``k``-th best ``score`` a running top-k (:func:`keep_top`) holds ``[head]``:
    what a new row must reach to enter it; ``-inf`` while it holds fewer than ``k``."""
    if state is None or state["score"].shape[1] < k:
        return torch.full((n_heads,), -float("inf"))
    return state["score"].min(1).values


def entrants(rows: dict, score: torch.Tensor, floor: torch.Tensor, k: int) -> dict:
    """The rows of ``rows`` (``[head, n, ...]``, with ``instance``) that can still enter a running
    top-``k`` whose ``k``-th best score per head is ``floor [head]`` (:func:`kth_best`): per head
    its ``m`` best by ``score [head, n]`` under :data:`TIE_RULE`, with ``m`` the most rows any head
    has scoring at least its floor (NaN too), at most ``k``. Every row that could enter is among
    them (a row tied with the floor may, when its instance index is lower), so :func:`keep_top` of
    the state and these equals it of the state and all ``rows``; only these leave the server."""
    reach = ~(score < floor.to(score.device, score.dtype)[:, None])
    m = min(k, int(reach.sum(1).max()))
    return take(rows, ranked(score, rows["instance"], m))


__all__ = ["TIE_RULE", "entrants", "keep_top", "kth_best", "ranked", "take"]
