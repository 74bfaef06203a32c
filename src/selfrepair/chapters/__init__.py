"""One module per chapter of the book: its config type (exactly the parameters its notebook's
``parameters`` cell lists), ``measure(cfg)`` returning everything the chapter shows, its claims as
data (:mod:`selfrepair.claims`) and the computed paragraphs.

:data:`CHAPTERS` maps each notebook (by the two-digit prefix of its file name) to its module; the
book runner uses it to validate every chapter's parameters before executing anything.
"""

from __future__ import annotations

import importlib

import pandas as pd

from ..config import parse_head
from ..errors import InputError
from ..results import head_label

CHAPTERS = {"00": "intro", "01": "existence", "02": "layernorm", "03": "neurons",
            "04": "iterative", "05": "hydra", "06": "across", "07": "atp",
            "08": "ioi", "09": "scorecard"}


def chapter_module(prefix: str):
    """The chapter module of a notebook prefix (``"01"``) or stem (``"01_self_repair_exists"``)."""
    key = str(prefix)[:2]
    if key not in CHAPTERS:
        raise InputError(f"no chapter {prefix!r}: chapters are {', '.join(CHAPTERS)}")
    return importlib.import_module(f"{__name__}.{CHAPTERS[key]}")


def featured(per_head: pd.DataFrame, labels, choose, *, rule: str, stands_for=()) -> pd.DataFrame:
    """The heads a figure shows: ``labels`` (pinned, e.g. the paper's own heads) if given, else
    ``choose(per_head)`` (a frame of rows of ``per_head``, picked by the paper's criterion for that
    figure; a ``reason`` column of its own says why each row was picked, else ``rule`` is every
    row's reason). Columns ``layer, head, label, reason`` and ``stands_for`` (for chosen heads: the
    paper's head each stands in for, by position)."""
    if labels:
        pairs = [parse_head(s) for s in labels]
        known = set(zip(per_head["layer"], per_head["head"]))
        missing = [head_label(*p) for p in pairs if p not in known]
        if missing:
            raise InputError(f"heads {missing} are not heads of this model: labels run L0H0 .. "
                             f"{per_head.sort_values(['layer', 'head'])['label'].iloc[-1]}")
        rows = per_head.set_index(["layer", "head"]).loc[pairs].reset_index()
        reason = "pinned by the parameters"
    else:
        rows, reason = choose(per_head).reset_index(drop=True), rule
    out = rows if not labels and "reason" in rows.columns else rows.assign(reason=reason)
    out["stands_for"] = ["" if labels or i >= len(stands_for) else stands_for[i] for i in range(len(out))]
    return out


def check(cfg) -> None:
    """Everything about a chapter's config that can be checked before the first forward pass, so a
    run that starts also finishes: the model loads; every head label names a head of it; the corpus
    holds enough text for ``n_tokens`` rows of ``seq_len`` that fit the model's context and
    vocabulary (and at least 2 rows for resample sources); plus the chapter's own checks (its
    module's ``check_model(cfg, model)``: prompts, layers, heads upstream of a layer ...)."""
    import sys

    from ..config import CorpusConfig, RunConfig
    from ..experiment import open_model, open_tokens

    if not isinstance(cfg, RunConfig):  # a page that runs no model (the scorecard): nothing to check
        return
    model = open_model(cfg)
    for name in cfg.HEAD_FIELDS:
        value = getattr(cfg, name)
        for label in [value] if isinstance(value, str) else (value or ()):
            layer, head = parse_head(label)
            if not (0 <= layer < model.n_layers and 0 <= head < model.n_heads):
                raise InputError(f"{name}: {label} is not a head of {model.name} ({model.n_layers} layers x "
                                 f"{model.n_heads} heads: L0H0 .. L{model.n_layers - 1}H{model.n_heads - 1})")
    if isinstance(cfg, CorpusConfig):
        data = open_tokens(cfg, model, progress=False)
        if len(data) < 2 and getattr(cfg, "ablation", "resample") == "resample":
            raise InputError(f"n_tokens={cfg.n_tokens} makes {len(data)} row of {cfg.seq_len} tokens; "
                             "resample ablation needs at least 2 (a row's source is another row): "
                             "raise n_tokens or lower seq_len")
    module = sys.modules[type(cfg).__module__]
    if hasattr(module, "check_model"):
        module.check_model(cfg, model)


VALUE_BIASES = "00_introduction.html#value-biases"  # the one explanation of the convention (the introduction)


def value_bias_note(cfg, changes: str, where: str = VALUE_BIASES) -> str:
    """A Markdown bullet: in one sentence, which head-output convention this run used (from
    ``cfg.fold_value_biases`` and the model's weights, :mod:`selfrepair.value_bias`), linking to the
    introduction's explanation (``where``); on a model with value biases, then what the convention
    changes in this chapter (``changes``, a sentence). The explanation itself is said once, there."""
    from ..experiment import open_model

    model = open_model(cfg)
    link = f'<a href="{where}">how a head\'s value bias is counted</a>'
    v = model.adapter.value
    if v is None or all(getattr(model.module(v, l), "bias", None) is None for l in range(model.n_layers)):
        return f"- **No value biases.** {model.name} has none, so {link} changes nothing here."
    if model.meta.get("fold_value_biases"):
        lead = (f"- **Value biases folded.** This run counted each head's value bias in its layer's output bias, "
                f"as the paper's code did ({link}).")
    else:
        lead = (f"- **Value biases inside the heads.** This run counted each head's value bias as part of its "
                f"output, where the paper's code folded it into the layer's bias ({link}).")
    return f"{lead} {changes}"
