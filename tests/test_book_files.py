"""The shared tiny build (conftest's ``book``, the Pages workflow's build step) has what readers of a Jupyter Book expect:
launch (Colab, Binder), repository, issue and download buttons naming the repository the build
was given and no other, and under every chart of every chapter its data as CSV (the chart's
fields as columns) and the chart as SVG and PNG."""

from __future__ import annotations

from book_pages import button_problems, chart_file_problems, fields_derived, fields_encoded
from book_helpers import BOOK, job_env, load

# what the build job's env gives the shared build (a fork's repository)
BOOK_REPOSITORY = job_env(load(BOOK)["jobs"]["build"])


def test_every_page_has_its_buttons(book):
    problems = button_problems(book.html, book.out / "src",
                               BOOK_REPOSITORY["SELFREPAIR_REPOSITORY"],
                               BOOK_REPOSITORY["SELFREPAIR_LAUNCH_BRANCH"])
    assert not problems, "\n".join(problems[:20])


def test_button_check_finds_a_fixed_owner(book):
    """The check above can fail: asked for another repository, it reports every page."""
    problems = button_problems(book.html, book.out / "src", "https://github.com/upstream/selfrepair",
                               BOOK_REPOSITORY["SELFREPAIR_LAUNCH_BRANCH"])
    assert any("links github.com/someone/selfrepair-fork" in p for p in problems)


def test_every_chart_offers_its_data_and_images(book):
    counted, problems = 0, []
    for executed in sorted((book.out / "src" / "book").glob("0*.ipynb")):
        n, found = chart_file_problems(book.html, executed)
        counted, problems = counted + n, problems + found
    assert counted >= 9 and not problems, "\n".join(problems[:20])


def test_fields_of_a_spec():
    spec = {"layer": [{"encoding": {"x": {"field": "a\\.b"}, "tooltip": [{"field": "c"}],
                                    "color": {"condition": {"field": "d"}, "value": "red"}}}],
            "facet": {"column": {"field": "e"}}, "transform": [{"fold": ["a"]}, {"calculate": "1", "as": "f"},
                                                               {"window": [{"op": "rank", "as": "g"}]}]}
    assert fields_encoded(spec) == {"a.b", "c", "d", "e"}
    assert fields_derived(spec) == {"key", "value", "f", "g"}
