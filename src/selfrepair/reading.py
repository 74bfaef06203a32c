"""The book's one reading of the papers' words and of the decision rule, said once (on the
scorecard page, :data:`READING`) and linked from every chapter's rules table, instead of repeated
in each chapter (issue 25); and the short names a summary gives a claim and its number
(:func:`short_label`, :func:`quantity`).

Every word a claim reads ("many", "most", "significant", ...) has one reason, kept in the claims'
rules (:mod:`selfrepair.rules`); :func:`words_reading` lists each word once with the claims that
read it, each item carrying the anchor :func:`word_anchor` that the scorecard's rows link to.
"""

from __future__ import annotations

import html
import re

from .uncertainty import MIN_CLUSTERS

PAGE = "09_scorecard.html"  # the page that says the reading once
ANCHOR = "paper-words"  # its section's label (``(paper-words)=`` in the notebook)
READING = f"{PAGE}#{ANCHOR}"

# when an interval decides nothing (after "the interval"): part of it meets the rule and part does not
UNDECIDED = ("meets the rule only in part (it straddles the threshold, or an end is exactly at a threshold "
             "the rule leaves out, as 'above 50%' leaves out 50%)")


def word_anchor(word: str) -> str:
    """The HTML id of a word's reading: ``word-many``, ``word-approximately-70``."""
    return "word-" + (re.sub(r"[^a-z0-9]+", "-", word.lower()).strip("-") or "none")


def decision_rule() -> str:
    """When a verdict holds, differs or cannot tell: the one paragraph every chapter links to."""
    return ("A claim **holds** when the **whole** 95% interval of its estimate lies on the paper's side of "
            "the rule's threshold, and **differs** when the whole interval lies on the other side. A verdict "
            f"**cannot tell** when its interval {UNDECIDED} or is not reliable (fewer than {MIN_CLUSTERS} "
            "independent units), or when the claim cannot be tested on the run (its sentence says why).")


def words_reading(rows) -> str:
    """Each paper word once: ``rows`` are ``(word, reason, claims)`` with ``claims`` a list of
    ``(text, href)``; an item per word, with its anchor, its reason and the claims that read it."""
    words: dict[tuple[str, str], list] = {}
    for word, reason, claims in rows:
        if word and reason:
            said = words.setdefault((word, reason), [])
            said += [c for c in claims if c not in said]
    out = []
    for (word, reason), claims in words.items():
        links = ", ".join(f'<a href="{html.escape(h)}">{html.escape(t, quote=False)}</a>' for t, h in claims)
        read = f" Read by {len(claims)} {'claim' if len(claims) == 1 else 'claims'}: {links}." if claims else ""
        out.append(f'- <span id="{word_anchor(word)}"></span>**“{html.escape(word, quote=False)}”**: '
                   f"{html.escape(reason, quote=False)}.{read}")
    return "\n".join(out)


def link_sentence(words=()) -> str:
    """The one sentence a chapter's rules table says instead of the general reading: the papers'
    ``words`` its claims read, each linked to its reading, and where the decision rule is said."""
    words = [w for w in dict.fromkeys(words) if w]
    links = [f'<a href="{PAGE}#{word_anchor(w)}">“{html.escape(w, quote=False)}”</a>' for w in words]
    read = (f"This chapter's claims read the papers' {'word' if len(links) == 1 else 'words'} "
            f"{', '.join(links[:-1]) + ' and ' + links[-1] if len(links) > 1 else ''.join(links)}. "
            if links else "")
    return (f"{read}How each of the papers' words is read, and when a verdict holds, differs or cannot tell, "
            f'is said once for the whole book, <a href="{READING}">on the scorecard page</a>.')


def short_label(statement: str) -> str:
    """A claim's short name for a summary or a chart row: its statement up to its first colon
    ("Self-repressing heads exist: fed their own output ..." → "Self-repressing heads exist"),
    else the whole statement, without a closing full stop."""
    head = statement.split(": ", 1)[0]
    return (head if len(head.split()) >= 2 else statement).rstrip(". ")


def quantity(claim) -> str:
    """What a claim's number is, in a few words: its own ``quantity`` where it carries one, else
    the first clause of its metric ("the share of late-layer heads whose ... is positive")."""
    if getattr(claim, "quantity", ""):
        return claim.quantity
    metric, depth, cut = claim.metric, 0, None
    for lead in ("among ", "for ", "over "):  # a population first: the quantity follows its comma
        if metric.startswith(lead) and ", " in metric:
            metric = metric.split(", ", 1)[1]
    for i, ch in enumerate(metric):  # the first clause of at least four words, outside brackets
        depth += (ch in "(") - (ch in ")")
        if depth == 0 and metric[i:i + 2] in (", ", "; ", " (", ": ") and len(metric[:i].split()) >= 4:
            cut = i
            break
    words = metric[:cut].split()
    return " ".join(words[:16]) + ("…" if len(words) > 16 else "")
