"""What a build actually ran: the models and data of the verdict records in a results cache.

The introduction and the scorecard say, near their top and beside every headline count, on which
model and data the verdicts were decided, and whether any was decided on the papers' own models
(Pythia, GPT-2, ...). Everything here is read from the records (:mod:`selfrepair.verdict_records`):
nothing is typed.
"""

from __future__ import annotations

import re
from pathlib import Path

from .tables import counted, listed

# the papers' own models (the self-repair paper's Pythia, GPT-2 and Llama; the Hydra paper's
# Chinchilla); a record whose model label matches one was decided on a paper's model
PAPER_MODELS = re.compile(r"pythia|gpt-?2|llama|chinchilla", re.IGNORECASE)
PAPER_NAMES = "Pythia, GPT-2"  # the papers' public models, in words
PAPER_COMMAND = "selfrepair book --profile paper --device cuda"  # the papers' models at their scale


def is_paper_model(label: str) -> bool:
    """Whether a model label names one of the papers' trained models (``tiny-gpt2``, a random test
    model of the family, does not)."""
    return not str(label).startswith("tiny-") and bool(PAPER_MODELS.search(str(label)))


def model_phrase(label: str) -> str:
    """A model label in words: the embedded model says how its weights were stored."""
    from .models.loading import EMBEDDED_MODEL
    from .verdict_records import FOLDED

    base = str(label).removesuffix(FOLDED)
    if base == EMBEDDED_MODEL:
        return f"{label} (4-bit, dequantized)"
    if base.startswith("tiny-"):
        return f"{label} (random weights: a test model)"
    return str(label)


def data_phrase(params: dict) -> str:
    """A record's data in words, from its parameters."""
    if params.get("n_tokens") is not None:
        dataset = params.get("dataset", "embedded")
        what = {"embedded": "the embedded corpus", "tiny": "the tiny test corpus"}.get(dataset, f"`{dataset}`")
        return f"{int(params['n_tokens']):,} tokens of {what}"
    if "names" in params or "name_movers" in params:
        return f"{counted(params['n_prompts'], 'IOI prompt')}" if params.get("n_prompts") else "IOI prompts"
    if "prompts" in params or "n_patches" in params:
        return (f"{counted(params['n_prompts'], 'factual-recall prompt')}" if params.get("n_prompts")
                else "the bundled factual-recall prompts")
    return "its own inputs"


def scope(records: dict) -> dict[str, dict[str, list[str]]]:
    """``{model: {data phrase: [chapters]}}`` of the records :func:`selfrepair.verdict_records.latest`
    returns (``{(chapter, model): (record, verdicts)}``), in chapter order."""
    out: dict[str, dict[str, list[str]]] = {}
    for (chapter, model), (record, _) in sorted(records.items()):
        out.setdefault(model, {}).setdefault(data_phrase(record.get("params", {})), []).append(chapter)
    return out


def read_scope(cache_dir: str | Path) -> dict[str, dict[str, list[str]]]:
    """:func:`scope` of the records of this library version in ``cache_dir``."""
    from .verdict_records import latest, scan, this_version

    return scope(latest(this_version(scan(cache_dir)[0])[0]))


def on_what(data: dict[str, list[str]], main_only: bool = False) -> str:
    """One model's data in words: the most used first, the others with their chapters."""
    ranked = sorted(data.items(), key=lambda kv: -len(kv[1]))
    if main_only or len(ranked) == 1:
        return ranked[0][0]
    return ranked[0][0] + " (" + "; ".join(f"{listed(chs, 'chapter')}: {d}" for d, chs in ranked[1:]) + ")"


def models_sentence(found: dict[str, dict[str, list[str]]], lead: str = "This build's chapters ran on",
                    where: str = "this build") -> str:
    """Which models and data the records hold, and whether the papers' own models are among them."""
    if not found:
        return ("No chapter has recorded a verdict in this build's results cache yet, so this build "
                "has no results on any model; the papers' own models (" + PAPER_NAMES + ") run with "
                f"`{PAPER_COMMAND}`, on a machine with the Hugging Face hub and a GPU.")
    parts = [f"**{model_phrase(m)}** ({listed(sorted({c for cs in d.values() for c in cs}), 'chapter')}) "
             f"with {on_what(d)}" for m, d in found.items()]
    paper = [m for m in found if is_paper_model(m)]
    text = f"{lead} " + "; and on ".join(parts) + "."
    if paper:
        text += f" Of these, {listed(paper, 'model')} {'is' if len(paper) == 1 else 'are'} among the papers' own models."
    else:
        text += (f" **None of the papers' own models ({PAPER_NAMES}, …) is in {where}**: they need their "
                 "weights and The Pile from the Hugging Face hub and a GPU for a million tokens, and run with "
                 f"`{PAPER_COMMAND}` (the `paper` profile: each chapter on the paper's model and heads).")
    return text


__all__ = ["PAPER_COMMAND", "PAPER_MODELS", "PAPER_NAMES", "data_phrase", "is_paper_model", "model_phrase",
           "models_sentence", "on_what", "read_scope", "scope"]
