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
        "falls by 500% of itself (it turns negative; 95% interval -598% to -386%)")
    assert moved(_est(-1.96, -2.27, -1.68), ".0%", gives_back) == (
        "take away a further 196% (the opposite of giving back; 95% interval -227% to -168%)")
    assert moved(_est(0.3, 0.1, 0.5), ".0%", gives_back) == "give back 30% (95% interval 10% to 50%)"
