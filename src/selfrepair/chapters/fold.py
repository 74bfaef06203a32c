"""A chapter's other readings of one number, one click away: a titled fold of short lines, each
saying what the reading measures and why it differs from the chapter's one answer (chapters 2
and 5; issue 25's "one number, one definition")."""
from __future__ import annotations

import html
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Fold:
    """A short lead and its lines one click away: a ``<details>`` element under a readable title.
    ``lead`` and ``lines`` are HTML (text escaped, links kept); the text form strips the tags."""

    title: str
    lead: str
    lines: tuple[str, ...]

    def _repr_html_(self) -> str:
        items = "".join(f"<li>{line}</li>" for line in self.lines)
        return (f'<details class="selfrepair-fold"><summary>{html.escape(self.title)}</summary>'
                f"<p>{self.lead}</p><ul>{items}</ul></details>")

    def __repr__(self) -> str:
        text = "\n".join([self.title, self.lead, *(f"- {line}" for line in self.lines)])
        return html.unescape(re.sub(r"<[^>]+>", "", text))


def fold_line(name: str, value: str, what: str, link: tuple[str, str] | None = None) -> str:
    """One fold line: the reading's name in bold, its value, what it measures and why it differs
    from the headline (escaped), and an optional (anchor, words) link."""
    tail = f' (<a href="#{link[0]}">{html.escape(link[1])}</a>)' if link else ""
    return f"<b>{html.escape(name)}</b>: {html.escape(value)}. {html.escape(what)}{tail}."
