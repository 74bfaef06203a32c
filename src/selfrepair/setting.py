"""What a chapter ran, on what — in words, near the top of every chapter (:func:`run_summary`).

The model is described from what was loaded (family, parameter count, layers and heads, how its
weights were stored, the precision it ran in), the data from what was measured (tokens and rows
of the token set, the corpus's documents and sources; or the prompts), each beside the setup of
the paper the chapter follows. The papers' setups are quoted here and nowhere else
(:data:`PAPERS`): the self-repair paper's "1 million tokens of The Pile" (§2.2 and footnote 1),
the Hydra paper's 1,209 Counterfact prompts on Chinchilla 7B (§4), IOI on GPT-2 small (Wang et
al. 2023), attribution patching (Kramár et al. 2024).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

from .config import CorpusConfig, RunConfig
from .tables import counted

PILE_TOKENS = 1_000_000  # self-repair paper §2.2: "on 1 million tokens of The Pile"
COUNTERFACT_PROMPTS = 1_209  # Hydra paper §4: "all 1,209 contexts u in the Counterfact dataset"


@dataclass(frozen=True)
class PaperSetup:
    """What the paper a chapter follows measured, quoted."""

    source: str  # the paper and section
    models: str  # its models, in words
    data: str  # its data, in words
    quote: str  # the paper's own sentence about its setup
    tokens: int | None = None  # tokens of its corpus (None: it measured on prompts)
    prompts: int | None = None  # its prompts (None: it measured on a corpus)


_SELF_REPAIR = "Rushing & Nanda 2024,"
_PILE = ("we use 1 Million tokens for experiments with the Pythia suite of models and GPT2-Small and "
         "GPT2-Medium, but smaller amounts for the other models")  # footnote 1
PAPERS = {
    "intro": PaperSetup("Rushing & Nanda 2024; McGrath et al. 2023", "Pythia, GPT-2 and Llama models "
                        "(self-repair) and Chinchilla 7B (Hydra)", "1M tokens of The Pile and 1,209 "
                        "Counterfact prompts", _PILE, tokens=PILE_TOKENS),
    "existence": PaperSetup(f"{_SELF_REPAIR} §2", "Pythia-1B (Fig 2), Pythia-410M (Fig 3) and several models (Fig 1)",
                            "1M tokens of The Pile",
                            "We measure the self-repair of individual attention heads in Pythia-1B "
                            "[...] on 1 million tokens of The Pile", tokens=PILE_TOKENS),
    "layernorm": PaperSetup(f"{_SELF_REPAIR} §3", "Pythia-160M (Fig 4, 5, 15) and several models (Fig 6)",
                            "1M tokens of The Pile, each head's top 2% of tokens by direct effect",
                            "We take L11H2 in Pythia-160M [...] and ablate it across 1 million tokens "
                            "on The Pile", tokens=PILE_TOKENS),
    "neurons": PaperSetup(f"{_SELF_REPAIR} §4, App. C", "Pythia-160M (Fig 7) and Llama-7B, GPT-2 Small, "
                          "Pythia-160M and Pythia-410M (Fig 8, 11-14)",
                          "the top 2% of tokens of The Pile by the head's direct effect", _PILE,
                          tokens=PILE_TOKENS),
    "iterative": PaperSetup(f"{_SELF_REPAIR} §5.3, App. F", "GPT-2 Medium (Fig 18's L21H1)",
                            "tokens of The Pile", _PILE, tokens=PILE_TOKENS),
    "hydra": PaperSetup("McGrath et al. 2023, §4", "Chinchilla 7B (not public)", "the Counterfact prompts",
                        "for all layers l and all 1,209 contexts u in the Counterfact dataset",
                        prompts=COUNTERFACT_PROMPTS),
    "across": PaperSetup(f"{_SELF_REPAIR} §2.2, App. I", "GPT-2 Small/Medium and Pythia-160M/410M (released values)",
                         "1M tokens of The Pile", _PILE, tokens=PILE_TOKENS),
    "atp": PaperSetup("Kramár et al. 2024", "Pythia models",
                      "task prompts with matched corrupted prompts (attention and MLP nodes)", ""),
    "ioi": PaperSetup("Wang et al. 2023", "GPT-2 Small", "IOI prompts built from templates and names", ""),
}

FAMILIES = {"gemma3_text": "Gemma 3", "gemma3": "Gemma 3", "gemma2": "Gemma 2", "gemma": "Gemma",
            "gpt_neox": "GPT-NeoX (Pythia's architecture)", "gpt2": "GPT-2", "llama": "Llama",
            "mistral": "Mistral", "qwen2": "Qwen 2", "gptj": "GPT-J"}
PRECISIONS = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "float64": "fp64"}


def _size(n: int) -> str:
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M" if n >= 1e6 else f"{n / 1e3:.0f}k"


def _quantized(weights: str):
    """The GGUF quantization named in a model's ``weights`` description (``Q4_K_M``: group 1 the
    bits), or None."""
    return re.search(r"\bQ(\d+)_K(?:_[SML])?\b", weights)


def model_words(model, device: str = "cpu") -> str:
    """The loaded model in words: name, family, parameters, layers x heads, how its weights were
    stored (random, quantized) and the precision it ran in — all read from ``model``."""
    d = model.describe()
    family = FAMILIES.get(d["model_type"], d["model_type"])
    n_params = sum(p.numel() for p in model.hf.parameters())
    precision = PRECISIONS.get(d["dtype"], d["dtype"])
    weights = str(d.get("weights", ""))
    quant = _quantized(weights)
    test = ""
    if weights.startswith("random"):
        stored = f"random weights ({weights.split('(', 1)[-1].rstrip(')')}) in {precision}"
        test = " — a test model, whose numbers say nothing about trained models"
    elif quant:
        stored = f"{quant.group(1)}-bit quantized weights ({quant.group(0)} GGUF) dequantized to {precision}"
    else:
        stored = f"weights in {precision}"
    return (f"`{d['model']}`: a {family} model with {_size(n_params)} parameters "
            f"({counted(d['n_layers'], 'layer')} × {counted(d['n_heads'], 'head')}), {stored}, "
            f"run on {device}{test}")


def corpus_words(cfg: CorpusConfig, data, sources: Counter) -> str:
    """The token set in words: tokens and rows measured, how the rows were cut from the corpus's
    documents (the ``packing``), and the corpus's documents and sources."""
    n_rows, seq_len = (int(s) for s in data.tokens.shape)
    what = {"embedded": "the embedded corpus, standing in for The Pile", "tiny": "a synthetic corpus of "
            "random English words (for tests)"}.get(cfg.dataset, f"the dataset `{cfg.dataset}`")
    kinds = (" from " + ", ".join(f"{name} ({n})" for name, n in sources.most_common())
             if len(sources) > 1 else "")
    main = data.main_document
    n_docs = len(set(main.tolist())) if main is not None else None
    cut = ("each row a window of its own document" if cfg.packing == "document" else
           "the documents joined and cut into rows, as the paper's code does"
           + (f" ({counted(n_docs, 'document')} hold most of the rows' tokens)" if n_docs else ""))
    return (f"{n_rows * seq_len:,} tokens ({counted(n_rows, 'row')} of {seq_len}; {cut}) of {what}, "
            f"which has {counted(sum(sources.values()), 'document')}{kinds}")


def _sources(cfg: CorpusConfig) -> Counter:
    from .data import load_corpus, tiny_corpus
    from .experiment import tiny_documents

    corpus = (tiny_corpus(tiny_documents(cfg), seed=cfg.seed) if cfg.dataset == "tiny"
              else load_corpus(cfg.dataset))
    names = corpus["pile_set_name"] if "pile_set_name" in corpus.column_names else ["documents"] * len(corpus)
    return Counter(names)


def data_words(cfg: RunConfig, model, paper: PaperSetup, sources: Counter | None = None) -> str:
    """What this chapter measured on, beside the paper's amount of it (``sources``: the corpus's
    documents by source, read here when not given)."""
    from .experiment import open_prompts, open_tokens, shown_path

    if isinstance(cfg, CorpusConfig):
        data = open_tokens(cfg, model, progress=False)
        text = corpus_words(cfg, data, sources if sources is not None else _sources(cfg))
        n = int(data.tokens.numel())
        if paper.tokens:
            text += f" — {n / paper.tokens:.1%} of the paper's {paper.tokens:,} tokens of The Pile"
        return text
    if hasattr(cfg, "prompts"):  # the factual prompts of the Hydra chapter
        n = len(open_prompts(model, cfg.prompts, cfg.n_prompts, cfg.seed).input_ids)
        text = f"{counted(n, 'factual-recall prompt')} (`{shown_path(cfg.prompts) or 'data/factual_prompts.csv'}`)"
    elif hasattr(cfg, "names"):  # IOI prompts, generated
        text = f"{counted(cfg.n_prompts, 'IOI prompt')} generated from Wang et al.'s templates"
    else:  # the introduction's live check
        return (f"{counted(cfg.demo_rows, 'row')} of {cfg.demo_positions} positions of the "
                f"`{cfg.dataset}` corpus, for the live check of eq. 2")
    if paper.prompts:
        text += f" — against the paper's {paper.prompts:,} Counterfact prompts"
    return text


def run_summary(cfg: RunConfig) -> str:
    """Markdown for the top of a chapter: the model and the data this page ran on, in words,
    beside the paper's (quoted), and which numbers on the page are the paper's. A config that
    runs no model gives its own (its ``run_summary()``)."""
    from .experiment import open_model

    if not isinstance(cfg, RunConfig):  # a page that runs no model (the scorecard) says what it read
        return cfg.run_summary()
    chapter = type(cfg).__module__.rsplit(".", 1)[-1]
    paper = PAPERS.get(chapter)
    model = open_model(cfg)
    device = cfg.device if not cfg.remote else f"{cfg.remote} (remote)"
    lines = [f"- **Model.** {model_words(model, device)}."]
    sources = _sources(cfg) if isinstance(cfg, CorpusConfig) else None  # read once, said twice
    lines.append(f"- **Data.** {data_words(cfg, model, paper or PAPERS['intro'], sources)}.")
    if paper is not None:
        quote = f": “{paper.quote}”" if paper.quote else ""
        lines.append(f"- **The paper** ({paper.source}) ran {paper.models} on {paper.data}{quote}.")
    lines.append(f"- **Whose numbers.** {whose_numbers(type(cfg).__module__)}")
    caveat = _caveat(cfg, model, sources)
    if caveat:
        lines.append(f"- **What this can change.** {caveat}")
    return "**What ran here.**\n\n" + "\n".join(lines)


def whose_numbers(module: str) -> str:
    """One sentence: every number on a chapter's page is computed on what ran; the paper's own are
    said to be the paper's — with the chapter's own example (its first claim that quotes the
    paper's value, as its verdict prints it), and none where the chapter quotes no paper value."""
    import sys

    from .rules import number

    claims = getattr(sys.modules.get(module), "CLAIMS", ())
    quoted = next((c for c in claims if getattr(c, "paper", None) is not None), None)
    example = f", as in “the paper reports {number(quoted.paper, quoted.fmt)}”" if quoted else ""
    return ("Every number and chart here is computed on the model and data above; the paper's own "
            f"numbers are marked as the paper's{example}.")


def _caveat(cfg: RunConfig, model, sources: Counter | None = None) -> str:
    """Where this run differs from the paper's in ways that can move its numbers: quantized weights,
    a corpus other than The Pile; "" when neither applies."""
    quant = _quantized(str(model.describe().get("weights", "")))
    reasons = []
    if quant:
        reasons.append(f"the weights were quantized to {quant.group(1)} bits before they were dequantized, so this "
                       "is not exactly the released model")
    if getattr(cfg, "dataset", None) == "embedded":
        sources = sources if sources is not None else _sources(cfg)
        top = sources.most_common(2)
        share = sum(n for _, n in top) / sum(sources.values())
        reasons.append(f"{share:.0%} of the embedded corpus's documents are {top[0][0]} and {top[-1][0]}, not "
                       "The Pile's mix of web text, code and papers")
    if not reasons:
        return ""
    text = "; ".join(reasons)
    which = "Either" if len(reasons) > 1 else "This"
    return (text[0].upper() + text[1:] + f". {which} can move a number or a verdict, by an amount this "
            "run cannot tell; a verdict that differs from the paper is a difference on this model and data, "
            "not a refutation of the paper.")


__all__ = ["COUNTERFACT_PROMPTS", "PAPERS", "PILE_TOKENS", "PaperSetup", "corpus_words", "data_words",
           "model_words", "run_summary", "whose_numbers"]
