"""Draw the README's figure: the self-repair paper's Fig 1 from the per-head values its authors
released (data/reference), as the book's chapter 6 draws it, into docs/self-repair-per-layer.png.

    .venv/bin/python scripts/readme_figure.py

Offline (vl-convert); run it again when the chart's function or the book's theme changes.
"""

from pathlib import Path

from selfrepair.chapters.across import load_paper_reference
from selfrepair.figures import use_book_renderer
from selfrepair.figures.across import fig_layer_profiles
from selfrepair.figures.export import chart_images

OUT = Path(__file__).resolve().parents[1] / "docs" / "self-repair-per-layer.png"

if __name__ == "__main__":
    use_book_renderer()  # the book's theme
    _, png = chart_images(fig_layer_profiles(load_paper_reference()).to_dict(), scale=1.5)
    OUT.write_bytes(png)
    print(f"{OUT.relative_to(OUT.parents[1])}: {len(png):,} bytes")
