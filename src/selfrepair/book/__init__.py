"""The book: the runner (:mod:`selfrepair.book.runner`: papermill, then Jupyter Book), its offline
JavaScript (:mod:`selfrepair.book.assets`) and its Sphinx extension (:mod:`selfrepair.book.sphinx`)."""

from .assets import vendor_assets
from .runner import (ChapterRun, build_html, chapter_notebooks, execute_chapters, find_root,
                     load_profile, restrict_toc, run_book, stage_source)

__all__ = ["ChapterRun", "build_html", "chapter_notebooks", "execute_chapters", "find_root",
           "load_profile", "restrict_toc", "run_book", "stage_source", "vendor_assets"]
