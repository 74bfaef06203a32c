"""What a course can plan with: per chapter, its exercises and an estimate of the class time.

Counted from the chapter notebooks themselves (their Markdown and their exercise directives), so
the landing page's table follows the book as it changes. The estimate is a rule of thumb stated
with the table: reading at :data:`READ_WPM` words a minute, :data:`PREDICT_MIN` minutes per
"predict" question and :data:`IMPLEMENT_MIN` per "implement it" exercise.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd

from ..tables import Layout

READ_WPM = 150  # technical prose with equations and charts to read
PREDICT_MIN = 3  # write a prediction down, then compare with the revealed answer
IMPLEMENT_MIN = 15  # write a short function, run the check, fix it
PLAN_TABLE = Layout(("chapter", "title", "predict questions", "implement exercises", "class time (min)"),
                    # short headers (the sentence above names them); a phone shows the titles and
                    # the minutes, the exercises per chapter one click away
                    names={"predict questions": "predict", "implement exercises": "implement",
                           "class time (min)": "minutes"},
                    phone=("chapter", "title", "class time (min)"))
LABEL = re.compile(r"^:label: (predict|implement)-", re.M)


def _markdown(path: Path) -> str:
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    return "\n".join("".join(c["source"]) if isinstance(c["source"], list) else c["source"]
                     for c in cells if c["cell_type"] == "markdown")


def teaching_plan(root: str | Path | None = None) -> pd.DataFrame:
    """One row per chapter notebook under ``root/book`` (default: the book found from the cwd)."""
    from ..book import chapter_notebooks, find_root

    rows = []
    for path in chapter_notebooks(find_root(root)):
        md = _markdown(path)
        title = next((line[2:].strip() for line in md.splitlines() if line.startswith("# ")), path.stem)
        kinds = LABEL.findall(md)
        n_predict, n_implement = kinds.count("predict"), kinds.count("implement")
        words = len(re.findall(r"[A-Za-z]{2,}", md))
        minutes = words / READ_WPM + PREDICT_MIN * n_predict + IMPLEMENT_MIN * n_implement
        rows.append({"chapter": path.stem[:2], "title": title, "predict questions": n_predict,
                     "implement exercises": n_implement, "words": words,
                     "class time (min)": int(5 * round(minutes / 5))})
    return pd.DataFrame(rows)


def teaching_markdown(plan: pd.DataFrame) -> str:
    """The rule behind the table's estimate and the totals."""
    return (f"{int(plan['predict questions'].sum())} predict questions and "
            f"{int(plan['implement exercises'].sum())} implement-it exercises over {len(plan)} chapters; "
            f"about {int(plan['class time (min)'].sum())} minutes of class in all. Estimate per chapter: "
            f"its words at {READ_WPM} a minute, {PREDICT_MIN} minutes per prediction, {IMPLEMENT_MIN} per "
            "exercise (the running time of a chapter is in its provenance table).")


__all__ = ["IMPLEMENT_MIN", "PLAN_TABLE", "PREDICT_MIN", "READ_WPM", "teaching_markdown", "teaching_plan"]
