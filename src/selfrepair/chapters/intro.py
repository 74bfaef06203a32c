"""Chapter 0 — the introduction's live check: eq. 1 and eq. 2 on a few heads and tokens.

A few rows of the corpus (each with its resample source from another document of a larger token
set, as everywhere in the book), a few heads, every term of eq. 2 computed directly and the largest
per-token gap between the two sides of the identity.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd

from ..ablation import check_ablation
from ..batch import TokenSet
from ..config import CorpusConfig, RunConfig, parse_head
from ..errors import InputError
from ..experiment import open_model, open_tokens
from ..heads import self_repair
from ..structure import architecture_markdown  # noqa: F401 - shown by the introduction
from . import check

POOL_ROWS = 64  # rows the demo rows' resample sources are drawn from (several documents)


@dataclass(frozen=True)
class Config(RunConfig):
    dataset: str = "embedded"  # "embedded", "tiny", a local file/dir or a hub dataset id
    ablation: str = "resample"  # "resample", "mean" or "zero"
    featured_heads: tuple[str, ...] | None = None  # e.g. ["L17H3"]; None: two last-layer heads and one mid-layer head
    demo_rows: int = 2  # rows in the live check
    demo_positions: int = 16  # positions per row in the live check

    HEAD_FIELDS = ("featured_heads",)

    def validate(self) -> None:
        super().validate()
        check_ablation(self.ablation)
        if self.demo_rows < 1 or self.demo_positions < 2:
            raise InputError(f"demo_rows must be >= 1 and demo_positions >= 2, got {self.demo_rows}, "
                             f"{self.demo_positions}")
        if self.demo_rows > POOL_ROWS:
            raise InputError(f"demo_rows must be at most {POOL_ROWS}, got {self.demo_rows}")


def demo_heads(cfg: Any, model: Any) -> list[tuple[int, int]]:
    """``cfg.featured_heads`` as ``(layer, head)``, else the first two heads of the last layer and
    head 0 of a middle layer (late heads are where the paper finds most self-repair; a middle
    one has downstream heads and MLPs, so every term of eq. 2 is exercised)."""
    if cfg.featured_heads:
        return [parse_head(h) for h in cfg.featured_heads]
    last = model.n_layers - 1
    return sorted({(last, h) for h in range(min(2, model.n_heads))} | {((model.n_layers - 1) // 2, 0)})


def demo_tokens(cfg: Config, model: Any) -> TokenSet:
    """The first ``demo_rows`` rows of a :data:`POOL_ROWS`-row token set of ``demo_positions``
    tokens each, with their resample sources."""
    pool = open_tokens(CorpusConfig(model=cfg.model, device=cfg.device, dtype=cfg.dtype, seed=cfg.seed,
                                    dataset=cfg.dataset, n_tokens=POOL_ROWS * cfg.demo_positions,
                                    seq_len=cfg.demo_positions, top_percent=100), model, progress=False)
    rows = slice(0, cfg.demo_rows)
    return TokenSet.from_tensor(pool.tokens[rows], pool.corrupt_tokens[rows])


def closure_table(result: Any) -> pd.DataFrame:
    """Per head, the means of eq. 1 and eq. 2's terms and the largest per-token gap
    ``|self_repair - (from_heads + from_mlps + from_norm + from_block_norms)|``."""
    frame = result.to_frame()
    terms = ["from_heads", "from_mlps", "from_norm", "from_block_norms"]
    frame["eq2_gap"] = (frame["self_repair"] - frame[terms].sum(axis=1)).abs()
    agg = {q: "mean" for q in ["delta_logit", "delta_direct_effect", "self_repair", *terms]}
    return frame.groupby("label", sort=False).agg({**agg, "eq2_gap": "max"}).reset_index()


def closure_markdown(table: pd.DataFrame, tol: float = 1e-3) -> str:
    """One Markdown sentence on how closely eq. 2 closes in ``table`` (from :func:`closure_table`)."""
    worst = float(table["eq2_gap"].max())
    verdict = ("rounding error, as it should be when the norm term is computed directly rather "
               "than taken as a remainder" if worst <= tol else
               f"**more than the {tol:g} expected from rounding: something is wrong** (see the "
               "gotchas appendix)")
    return (f"Over {len(table)} heads and every token, the largest gap between eq. 1's self-repair "
            f"and the sum of eq. 2's terms is **{worst:.1e}** logits: {verdict}.")


@dataclass
class Intro:
    result: Any
    table: pd.DataFrame


def measure(cfg: Config, progress: bool = False) -> Intro:
    check(cfg)
    model = open_model(cfg)
    r = self_repair(model, demo_tokens(cfg, model), ablation=cfg.ablation, heads=demo_heads(cfg, model),
                    progress=progress)
    return Intro(r, closure_table(r))
