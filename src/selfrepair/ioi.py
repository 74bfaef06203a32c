"""Indirect object identification (Wang et al. 2023, "Interpretability in the Wild"): the prompt
set and the metric.

**Prompts.** Wang et al.'s templates (their App. E; the ``BABA`` templates of their dataset code),
filled from the committed lists below: two names, a place, an object. The *indirect object* IO
appears once, the *subject* S twice; the sentence's answer is IO::

    ABBA  "When Mary and John went to the store, John gave a drink to"  -> " Mary"
    BABA  "When John and Mary went to the store, John gave a drink to"  -> " Mary"

Prompts come in pairs with the same names, place, object and template, one in each order, so the
set is balanced between ABBA and BABA exactly. Every prompt starts with the tokenizer's BOS.

**Single tokens.** A name is usable when, read with the model's own tokenizer, it is exactly one
token wherever a template puts it (``" " + name``: the one token covering the name's characters;
a byte-level tokenizer splits off the space, and a name of one character is then still one
token, the prompt ending in the space). Names that are not are dropped and counted
(:attr:`IoiPrompts.dropped`). Places and objects may be several tokens: positions differ between
prompts, so the positions of IO, of S's two occurrences and of the end (the last prompt token,
which predicts the answer) are kept per prompt and every read is taken there. Prompts are
right-padded with BOS, exact in a causal model (nothing before the end reads the padding).

**Metric.** The logit difference ``logit(IO) − logit(S)`` at the end position, from the model's
raw logits: the mean over the vocabulary cancels in a difference, so it equals the difference of
the centered logits the rest of the library reads. Accuracy = the share of prompts with a positive
logit difference (IO preferred to S; not that IO is the top token).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .batch import tensor_digest
from .errors import InputError

# Wang et al.'s templates; {A} = IO, {B} = S in the BABA order written here ("[B] and [A]").
TEMPLATES = (
    "Then, {B} and {A} went to the {PLACE}. {B} gave a {OBJECT} to {A}",
    "Then, {B} and {A} had a lot of fun at the {PLACE}. {B} gave a {OBJECT} to {A}",
    "Then, {B} and {A} were working at the {PLACE}. {B} decided to give a {OBJECT} to {A}",
    "After {B} and {A} went to the {PLACE}, {B} gave a {OBJECT} to {A}",
    "When {B} and {A} got a {OBJECT} at the {PLACE}, {B} decided to give it to {A}",
    "While {B} and {A} were working at the {PLACE}, {B} gave a {OBJECT} to {A}",
    "While {B} and {A} were commuting to the {PLACE}, {B} gave a {OBJECT} to {A}",
    "Friends {B} and {A} found a {OBJECT} at the {PLACE}. {B} gave it to {A}",
)
# A subset of Wang et al.'s names (their NAMES list), places and objects.
NAMES = (
    "Aaron", "Adam", "Alan", "Alex", "Alice", "Amy", "Andrew", "Anna", "Anthony", "Arthur",
    "Brian", "Charles", "Charlie", "Christopher", "Daniel", "David", "Edward", "Emily", "Eric",
    "Frank", "George", "Henry", "Jack", "Jacob", "James", "Jane", "Jason", "Jennifer", "Jessica",
    "John", "Joseph", "Justin", "Kate", "Kevin", "Laura", "Lisa", "Luke", "Maria", "Mark",
    "Martin", "Mary", "Matthew", "Michael", "Paul", "Peter", "Rachel", "Richard", "Robert",
    "Rose", "Ryan", "Sarah", "Scott", "Simon", "Steven", "Thomas", "Tyler", "Victoria", "William",
)
# Stand-ins for a tokenizer that keeps none of NAMES whole (byte-level: one character is one token).
LETTER_NAMES = tuple("ABCDEFGH")
PLACES = ("store", "garden", "restaurant", "school", "hospital", "office", "house", "station")
OBJECTS = ("ring", "kiss", "bone", "basketball", "computer", "necklace", "drink", "snack")
ORDERS = ("ABBA", "BABA")


def fill(template: str, io: str, s: str, place: str, obj: str, order: str) -> str:
    """One sentence, answer included: ABBA names IO first, BABA names S first."""
    first, second = (io, s) if order == "ABBA" else (s, io)
    # the template is written BABA: its first two slots are {B} then {A}
    text = template.replace("{B} and {A}", "{X} and {Y}", 1)
    text = text.replace("{X}", first, 1).replace("{Y}", second, 1)
    return text.replace("{B}", s).replace("{A}", io).replace("{PLACE}", place).replace("{OBJECT}", obj)


def name_token(tokenizer, name: str) -> int | None:
    """The one token ``name`` is after a space (``" " + name``), or ``None`` if it is several."""
    enc = tokenizer(" " + name, add_special_tokens=False, return_offsets_mapping=True)
    covering = [t for t, (a, b) in zip(enc["input_ids"], enc["offset_mapping"]) if b > 1 and a < 1 + len(name)]
    return covering[0] if len(covering) == 1 else None


@dataclass
class IoiPrompts:
    """Right-padded IOI prompts (BOS first) and, per prompt, where IO, S and the end are."""

    input_ids: torch.Tensor  # [n, max_len] prompt tokens (the answer not included), BOS padded
    end_pos: torch.Tensor  # [n] the last prompt token (it predicts the answer)
    io_pos: torch.Tensor  # [n] IO's one occurrence
    s1_pos: torch.Tensor  # [n] S's first occurrence
    s2_pos: torch.Tensor  # [n] S's second occurrence
    io_token: torch.Tensor  # [n]
    s_token: torch.Tensor  # [n]
    template: torch.Tensor  # [n] index into TEMPLATES
    abba: torch.Tensor  # [n] bool: IO named first
    texts: list[str] = field(default_factory=list)  # the prompts (answer not included)
    names: list[str] = field(default_factory=list)  # the names that are single tokens
    dropped: list[str] = field(default_factory=list)  # the names that are not
    fingerprint: dict = field(default_factory=dict)

    def __post_init__(self):
        if not self.fingerprint:
            self.fingerprint = {"ioi": tensor_digest(self.input_ids, self.end_pos, self.io_pos,
                                                     self.s1_pos, self.io_token, self.s_token),
                                "n_prompts": len(self)}

    def __len__(self) -> int:
        return len(self.input_ids)

    def rows(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts ``idx`` cut to their longest and their end positions."""
        return self.input_ids[idx, :int(self.end_pos[idx].max()) + 1], self.end_pos[idx]

    def record(self) -> dict[str, torch.Tensor]:
        """The exact prompts a result was measured on (saved with it)."""
        return {"input_ids": self.input_ids, "end_pos": self.end_pos, "io_token": self.io_token,
                "s_token": self.s_token}


def usable_names(tokenizer, names=NAMES) -> tuple[list[str], list[str]]:
    """(single-token names, dropped names) in the order given."""
    keep, drop = [], []
    for n in names:
        (keep if name_token(tokenizer, n) is not None else drop).append(n)
    return keep, drop


def ioi_prompts(tokenizer, n_prompts: int, *, seed: int = 0, names=None) -> IoiPrompts:
    """``n_prompts`` (even) IOI prompts, in ABBA/BABA pairs, from :data:`TEMPLATES` and the
    single-token names of ``names`` (default :data:`NAMES`); seeded. See the module docstring."""
    if n_prompts < 4 or n_prompts % 2:
        raise InputError(f"n_prompts must be an even number >= 4 (each name pair in both orders, "
                         f"and resample sources among the other pairs), got {n_prompts}")
    names = list(NAMES if not names else names)
    if len(set(names)) != len(names):
        raise InputError(f"names are repeated: {sorted({n for n in names if names.count(n) > 1})}")
    keep, drop = usable_names(tokenizer, names)
    if len(keep) < 2:
        raise InputError(f"only {len(keep)} of the {len(names)} names are one token for this tokenizer "
                         f"(dropped: {', '.join(drop[:8])}{' ...' if len(drop) > 8 else ''}): IOI needs two "
                         "single-token names per prompt. Pass names= that the tokenizer keeps whole "
                         "(a byte-level tokenizer keeps only one-character names: A, B, ...)")
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if bos is None:
        raise InputError("the tokenizer has neither a BOS nor an EOS token to start the prompts with")
    g = torch.Generator().manual_seed(seed)
    rows, meta = [], []
    for k in range(n_prompts // 2):
        i, j = torch.randperm(len(keep), generator=g)[:2].tolist()
        t = k % len(TEMPLATES)
        place = PLACES[int(torch.randint(len(PLACES), (1,), generator=g))]
        obj = OBJECTS[int(torch.randint(len(OBJECTS), (1,), generator=g))]
        for order in ORDERS:
            text = fill(TEMPLATES[t], keep[i], keep[j], place, obj, order)
            rows.append(_locate(tokenizer, text, keep[i], keep[j], bos))
            meta.append((t, order == "ABBA"))
    width = max(len(r["ids"]) for r in rows)
    ids = torch.full((len(rows), width), bos, dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r, :len(row["ids"])] = torch.tensor(row["ids"])
    col = lambda key: torch.tensor([r[key] for r in rows], dtype=torch.long)  # noqa: E731
    return IoiPrompts(ids, col("end"), col("io"), col("s1"), col("s2"), col("io_token"), col("s_token"),
                      torch.tensor([m[0] for m in meta]), torch.tensor([m[1] for m in meta]),
                      texts=[r["text"] for r in rows], names=keep, dropped=drop)


def _locate(tokenizer, text: str, io: str, s: str, bos: int) -> dict:
    """Token ids of ``text`` without its answer, BOS first, and where IO, S and the end are."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]

    def token_at(start: int, name: str) -> int:
        hit = [k for k, (a, b) in enumerate(offsets) if b > start and a < start + len(name)]
        if len(hit) != 1:
            raise InputError(f"{name!r} is not one token inside {text!r}: its tokenizer splits it in "
                             "context (drop the name from names=)")
        return hit[0]

    spans = _spans(text, io, s)
    io_k, s1_k, s2_k, ans_k = (token_at(a, n) for a, n in spans)
    if ans_k != len(ids) - 1 or ids[ans_k] != ids[io_k] or ids[s1_k] != ids[s2_k]:
        raise InputError(f"the names of {text!r} do not tokenize the same at each occurrence")
    return {"ids": [bos] + ids[:ans_k], "end": ans_k, "io": io_k + 1, "s1": s1_k + 1, "s2": s2_k + 1,
            "io_token": ids[io_k], "s_token": ids[s1_k], "text": tokenizer.decode(ids[:ans_k])}


def _spans(text: str, io: str, s: str) -> list[tuple[int, str]]:
    """Character starts of IO's first occurrence, S's two and the answer (IO again, last)."""
    import re

    found = [(m.start(), m.group()) for m in re.finditer(rf"\b({re.escape(io)}|{re.escape(s)})\b", text)]
    if [n for _, n in found].count(io) != 2 or [n for _, n in found].count(s) != 2 or found[-1][1] != io:
        raise InputError(f"cannot find IO {io!r} once, S {s!r} twice and the answer at the end of {text!r}")
    io_first = next(a for a, n in found if n == io)
    s_starts = [a for a, n in found if n == s]
    return [(io_first, io), (s_starts[0], s), (s_starts[1], s), (found[-1][0], io)]


# -- the metric --------------------------------------------------------------------------------
def logit_diff(logits: torch.Tensor, end_pos: torch.Tensor, io_token: torch.Tensor,
               s_token: torch.Tensor) -> torch.Tensor:
    """``logit(IO) − logit(S)`` at each prompt's end: logits ``[n, pos, vocab]`` -> ``[n]``."""
    rows = torch.arange(len(end_pos))
    at_end = logits[rows, end_pos]
    return at_end[rows, io_token] - at_end[rows, s_token]


def summary(diff: torch.Tensor) -> dict[str, float]:
    """Accuracy (share of prompts with ``logit diff > 0``), mean and median logit difference."""
    d = diff.double()
    return {"n_prompts": len(d), "accuracy": float((d > 0).double().mean()),
            "mean_logit_diff": float(d.mean()), "median_logit_diff": float(d.median())}


__all__ = ["LETTER_NAMES", "NAMES", "OBJECTS", "ORDERS", "PLACES", "TEMPLATES", "IoiPrompts", "fill", "ioi_prompts",
           "logit_diff", "name_token", "summary", "usable_names"]
