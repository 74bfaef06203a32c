"""Signed numbers in words: a change is said from its sign, never "by -5%" or "a fall of -5%"."""
import re

from selfrepair.chapters.signed import changes, fall, gives_back, moved
from selfrepair.uncertainty import Estimate

BAD = re.compile(r"\b(by|of|back)\s+[-−+]")


def _est(value, lo, hi):
    return Estimate(value, lo, hi, 10, "prompts", 10, "prompts", 0, 100)


def test_changes_from_the_sign():
    assert changes(-4.56, "+.0%", relative=True) == "falls by 456% of itself (it turns negative)"
    assert changes(-0.43, "+.0%", relative=True) == "falls by 43% of itself"
    assert changes(0.5, "+.0%") == "rises by 50%"
    assert changes(0.0, "+.0%") == "does not change"
    assert changes(0.0004, "+.3f") == "does not change"


def test_fall_and_gives_back_from_the_sign():
    assert [fall(x, "+.0%") for x in (-4.59, 0.0, 0.2)] == ["a fall of 459%", "no change", "a rise of 20%"]
    assert gives_back(-1.96, ".0%") == "take away a further 196% (the opposite of giving back)"
    assert gives_back(0.0, ".2f") == "give back nothing"
    assert gives_back(0.33, ".2f") == "give back 0.33"
    assert gives_back(-0.67, ".2f", " logits") == "take away a further 0.67 logits (the opposite of giving back)"


def test_no_minus_after_by_of_back():
    for x in (-5.0, -0.67, 0.0, 0.67, 5.0):
        for said in (changes(x, "+.0%", relative=True), fall(x, "+.0%"), gives_back(x, ".0%"),
                     moved(_est(x, x - 1, x + 1), "+.0%", relative=True), moved(_est(x, x - 1, x + 1), ".0%", gives_back)):
            assert not BAD.search(said), said


def test_moved_keeps_the_interval_in_one_bracket():
    assert moved(_est(-5.0, -5.98, -3.86), "+.0%", relative=True) == (
        "falls by 500% of itself (it turns negative; 95% interval 386% to 598%)")
    assert moved(_est(-1.96, -2.27, -1.68), ".0%", gives_back) == (
        "take away a further 196% (the opposite of giving back; 95% interval 168% to 227%)")


def test_an_interval_is_read_in_the_frame_of_the_words_that_carry_the_sign():
    """After "falls by" the ends are sizes in increasing order; across 0 each end is said in words."""
    assert moved(_est(-4.56, -5.89, -2.04), "+.0%") == "falls by 456% (95% interval 204% to 589%)"
    assert moved(_est(-0.2, -0.5, 0.1), "+.0%") == (
        "falls by 20% (95% interval from a fall of 50% to a rise of 10%, which includes no change)")
    assert moved(_est(-0.3, -0.6, 0.2), ".0%", gives_back) == (
        "take away a further 30% (the opposite of giving back; 95% interval from taking away a further "
        "60% to giving back 20%, which includes giving back nothing)")
    assert moved(_est(0.3, 0.1, 0.5), "+.0%") == "rises by 30% (95% interval 10% to 50%)"
    for x in (-5.0, -0.3, 0.3):
        assert not re.search(r"interval [-−+]", moved(_est(x, x - 1, x + 1), "+.0%"))
    assert moved(_est(0.3, 0.1, 0.5), ".0%", gives_back) == "give back 30% (95% interval 10% to 50%)"


# -- a value compared with a threshold prints on its side of it (issue 25) --------------------------
def test_against_shows_which_side_of_a_threshold_a_value_is_on():
    from selfrepair.rules import against

    assert against(0.896, ".0%", (0.9,)) == "89.6%"  # not "90%", which reads as reaching 90%
    assert against(0.8996, ".0%", (0.9,)) == "89.96%"
    assert against(0.904, ".0%", (0.9,)) == "90.4%"
    assert against(0.9, ".0%", (0.9,)) == "90%"  # exactly on it: as it is
    assert against(0.93, ".0%", (0.9,)) == "93%" and against(0.896, ".0%") == "90%"  # far, or no threshold
    assert against(-0.004, "+.2f", (0.0,)) == "−0.004" and against(0.3, "+.2f", (0.0,)) == "+0.30"
    assert against(0.8999999, ".0%", (0.9,)) == "just under 90%"
    assert against(1e-9, ".0%", (0.0,)) == "just over 0"
    assert against(2.5e-7, ".1e", (1e-3,)) == "2.5×10⁻⁷"  # a scientific format is never rounded onto one


def test_a_verdicts_value_and_interval_print_on_their_side_of_the_rule():
    from selfrepair.chapters.layernorm_claims import RATIO
    from selfrepair.claims import Verdict, render

    claim = next(iter(RATIO.values()))  # "almost always": at least 90%, shown to .1%
    line = render([Verdict.of(claim, Estimate(0.89993, 0.89996, 0.93, 4, "heads", 30, "documents", 0, 100))])
    assert "**89.99%**" in line and "95% interval 89.996% to 93.0%" in line and "**cannot tell**" in line


def test_chapter2_per_head_shares_print_on_their_side_of_90_percent():
    """Issue 25: "1 of 4 heads" beside a list printing 93% and 90% (the second really 89.6%)."""
    import numpy as np

    from selfrepair.chapters.layernorm_claims import _per_head, heads_almost_always, share_of_few
    from selfrepair.uncertainty import Bootstrap

    shares = np.array([0.93, 0.896, 0.5, 0.2])
    t = np.stack([np.c_[np.full(4, 1000.0), 1000 * shares]] * 12)  # [cluster, head, (count, sum)]
    boot = Bootstrap(12, 50, 0, "documents")
    listed = _per_head(t, [(11, h) for h in range(4)], boot, ".0%", 0.9)
    assert "L11H0 93%" in listed and "L11H1 89.6%" in listed and "L11H1 90%" not in listed
    assert share_of_few(boot.estimate(heads_almost_always, t), 4) == "1 of these 4 heads"


def test_no_prose_formats_a_forced_sign_after_by_of_back():
    """Issue 25, at the source: no chapter, finding or reveal writes "by {x:+.3g}" (or a signed
    ``.prose('+...')`` or ``number(x, '+...')``) after "by", "of" or "back", within a string or across the strings of one
    sentence; a change is said from its sign (chapters.signed)."""
    from pathlib import Path

    import selfrepair

    root = Path(selfrepair.__file__).parent
    signed = r"\{[^}]*(:\+|prose\('\+|number\([^)]*'\+)"  # number(x, '+.3g'): rules.number, the minus sign
    pattern = re.compile(rf"\b(by|of|back)\s*(\"\s*\n\s*f?\"|\s){signed}")
    found = [f"{p.relative_to(root)}:{text[:m.start()].count(chr(10)) + 1}"
             for p in root.rglob("*.py") for text in [p.read_text()] for m in pattern.finditer(text)]
    assert not found, found
