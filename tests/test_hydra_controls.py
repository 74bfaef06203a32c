"""The Hydra measurement's controls and panels (selfrepair.hydra_controls, noise ablation in
selfrepair.hydra), on tiny random models of every family.

- noise ablation with σ = 0 is the identity; its draws are seeded per prompt, do not depend on
  batching, and scale with ``noise_scale`` (the own direct effect is affine in it: the same draws,
  scaled);
- the ablated layer's own direct effect: exactly 0 under zero ablation, the direct effect of the
  mean write under mean ablation, and the every-source resample average equals a real resample run
  with every other prompt as a patch;
- localisation: a plain-PyTorch forward with a hook that replaces a layer's write leaves every
  upstream write bit-identical, and the library reports exactly 0 change there;
- the frames (shares, fits, the Fig 8 selection) against hand computations.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pandas as pd
import pytest
import torch

from selfrepair import hydra_controls as hc
from selfrepair import load_model
from selfrepair.errors import InputError
from selfrepair.experiment import open_prompts
from selfrepair.hydra import HydraSpec, effects_frame, hydra_effect, noise_sigma, noisy_writes
from selfrepair.hydra_regression import fit_line, regression
from selfrepair.measure import RunOptions
from selfrepair.rules import number

from test_hydra import capture, synthetic_result, tol

from families import CORE as FAMILIES


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="module")
def model(family):
    return load_model("tiny-" + family, dtype="float64")


@pytest.fixture(scope="module")
def prompts(model):
    return open_prompts(model, None, 5, 0)


@pytest.fixture(scope="module")
def resample(model, prompts):
    return hydra_effect(model, prompts, n_patches=2, max_rows=8, progress=False)


def own(res):
    C = res.clean_de.shape[1]
    return torch.stack([res.ablated_de[:, c, :, c] for c in range(C)], 1)  # [n, C, P]


# -- noise ablation -------------------------------------------------------------------------------
def test_noise_with_zero_sigma_changes_nothing(model, prompts, resample):
    r = hydra_effect(model, prompts, ablation="noise", n_patches=2, noise_scale=0.0, progress=False)
    assert r.ablated_de.shape[2] == 2 and (r.patch_index == -1).all()
    torch.testing.assert_close(r.ablated_de, r.clean_de[:, None, None, :].expand_as(r.ablated_de),
                               atol=tol(model), rtol=0)
    for name in ("delta_logit", "from_norm", "from_block_norms"):
        assert getattr(r, name).abs().max() <= tol(model), name
    torch.testing.assert_close(r.clean_de, resample.clean_de, atol=tol(model), rtol=0)  # other batching


def test_noise_is_seeded_batch_independent_and_scales_with_sigma(model, prompts):
    one = hydra_effect(model, prompts, ablation="noise", n_patches=2, noise_scale=1.0, seed=3, progress=False)
    again = hydra_effect(model, prompts, ablation="noise", n_patches=2, noise_scale=1.0, seed=3, max_rows=1,
                         progress=False)
    other = hydra_effect(model, prompts, ablation="noise", n_patches=2, noise_scale=1.0, seed=4, progress=False)
    torch.testing.assert_close(again.ablated_de, one.ablated_de, atol=tol(model), rtol=0)
    torch.testing.assert_close(again.delta_logit, one.delta_logit, atol=tol(model), rtol=0)
    assert (other.ablated_de - one.ablated_de).abs().max() > 1e-3
    # the own direct effect is linear in the replacement: the same draws at 2.5 sigma move it 2.5x as far
    big = hydra_effect(model, prompts, ablation="noise", n_patches=2, noise_scale=2.5, seed=3, progress=False)
    clean = one.clean_de[:, :, None]
    torch.testing.assert_close(own(big) - clean, 2.5 * (own(one) - clean), atol=1e-9, rtol=1e-9)
    assert (own(one) - clean).abs().max() > 1e-3
    # eq. 2-style identity holds under noise too
    torch.testing.assert_close(big.delta_logit, big.delta_de.sum(-1) + big.from_norm + big.from_block_norms,
                               atol=tol(model), rtol=0)


def test_noisy_writes_sigma_is_a_multiple_of_the_write_rms():
    g = torch.Generator().manual_seed(0)
    writes = torch.randn(2, 3, 400, 64, generator=g, dtype=torch.float64) * torch.tensor([1.0, 5.0])[:, None, None, None]
    prompts = torch.arange(400)
    sums = {"sq": writes.pow(2).sum((2, 3))}
    sigma = noise_sigma(sums["sq"], 400 * 64, 3.0)
    rms = writes.pow(2).mean((2, 3)).sqrt()  # [2, L]
    torch.testing.assert_close(sigma, 3.0 * rms, rtol=1e-12, atol=0)
    noisy = noisy_writes(writes, prompts, 4, sigma, seed=1)
    assert noisy.shape == (2, 3, 4, 400, 64)
    eps = noisy - writes[:, :, None]
    np.testing.assert_allclose(eps.std((2, 3, 4)).numpy(), 3.0 * rms.numpy(), rtol=0.02)
    assert torch.equal(noisy_writes(writes, prompts, 4, 0 * sigma, seed=1), writes[:, :, None].expand_as(noisy))
    assert torch.equal(noisy, noisy_writes(writes, prompts, 4, sigma, seed=1))


def test_noisy_writes_draw_per_prompt_whatever_the_batch():
    """A prompt's draws depend on (seed, its index) only: a chunk of prompts draws exactly its rows
    of the whole set's draws, in any order; one more patch keeps the first draws."""
    writes = torch.randn(2, 3, 10, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sigma, prompts = torch.tensor([[1.0, 2.0, 3.0], [0.5, 0.5, 4.0]]), torch.arange(10)
    every = noisy_writes(writes, prompts, 3, sigma, seed=2)
    chunk = torch.tensor([7, 2, 5])
    assert torch.equal(noisy_writes(writes[:, :, chunk], chunk, 3, sigma, seed=2), every[:, :, :, chunk])
    assert torch.equal(noisy_writes(writes, prompts, 2, sigma, seed=2), every[:, :, :2])
    other = noisy_writes(writes, prompts, 3, sigma, seed=3)
    assert (other - every).abs().min() > 0  # another seed: other draws everywhere
    eps = (every - writes[:, :, None]) / sigma[:, :, None, None, None]
    assert (eps[..., 0, :] - eps[..., 1, :]).abs().min() > 0  # each prompt its own draws


def test_only_the_noise_key_names_its_draws(tmp_path, model, prompts):
    """A noise result drawn the old way (one generator over every prompt) is not reused from a
    cache: the noise key names the per-prompt draws; the other ablations' keys are their fields."""
    from dataclasses import asdict

    from selfrepair.hydra import NOISE_DRAWS
    from selfrepair.measure import Cache

    noise, resample = HydraSpec(ablation="noise", noise_scale=3.0), HydraSpec()
    assert noise.key() == {"kind": "hydra", **asdict(noise), "noise_draws": NOISE_DRAWS}
    assert resample.key() == {"kind": "hydra", **asdict(resample)}
    cache = Cache(tmp_path)
    before = cache.key(noise, model, prompts) | {"spec": {"kind": "hydra", **asdict(noise)}}
    assert cache.key(noise, model, prompts) != before  # the old entry's key: recomputed


def test_noise_needs_a_scale():
    with pytest.raises(InputError, match="noise_scale >= 0"):
        HydraSpec(ablation="noise").compute(None, None, RunOptions())
    with pytest.raises(InputError, match="noise_scale >= 0"):
        hydra_effect(None, None, ablation="noise", noise_scale=-1.0)
    with pytest.raises(InputError, match="unknown ablation"):
        HydraSpec(ablation="gaussian").compute(None, None, RunOptions())


# -- the ablated layer's own direct effect ----------------------------------------------------------
def test_own_direct_effect_zero_mean_and_every_source(model, prompts, resample):
    n = len(prompts)
    zero = hydra_effect(model, prompts, ablation="zero", progress=False)
    assert torch.equal(own(zero), torch.zeros_like(own(zero)))  # exactly: the layer writes nothing
    mean = hydra_effect(model, prompts, ablation="mean", progress=False)
    torch.testing.assert_close(own(mean)[..., 0], resample.mean_write_de, atol=1e-12, rtol=0)
    # every other prompt as a patch: a real resample run, averaged, is the every-source average
    others = torch.stack([torch.tensor([j for j in range(n) if j != i]) for i in range(n)])
    every = hydra_effect(model, prompts, patch_index=others, progress=False)
    torch.testing.assert_close(own(every).mean(2), resample.source_mean_de, atol=1e-12, rtol=0)
    # mean ablation = the every-source average but for the prompt's own write (weight 1/n)
    torch.testing.assert_close(resample.mean_write_de,
                               ((n - 1) * resample.source_mean_de + resample.clean_de) / n, atol=1e-12, rtol=0)
    assert resample.mean_write_de.abs().max() > 1e-3


def test_own_effects_frame_by_hand(resample):
    frame = hc.own_effects({"resample": resample})
    assert set(frame["ablation"]) == {"resample", "resample (every source)", "mean", "zero"}
    C = resample.clean_de.shape[1]
    o = own(resample)
    for c in (0, C - 1):
        row = frame[(frame["ablation"] == "resample") & (frame["layer"] == c // 2)
                    & (frame["kind"] == ("attn", "mlp")[c % 2])].iloc[0]
        assert row["ratio"] == pytest.approx(float(o[:, c].mean(1).abs().mean() / resample.clean_de[:, c].abs().mean()))
        assert row["patch_ratio"] == pytest.approx(float(o[:, c].abs().mean() / resample.clean_de[:, c].abs().mean()))
    assert (frame.loc[frame["ablation"] == "zero", "ratio"] == 0).all()
    s = hc.own_summary(frame).set_index("ablation")
    attn = o[:, 0::2].mean(2).abs().mean(0).sum() / resample.clean_de[:, 0::2].abs().mean(0).sum()
    assert s.loc["resample", "ratio"] == pytest.approx(float(attn))


# -- localisation ---------------------------------------------------------------------------------
def test_upstream_components_change_by_exactly_zero(family, model, prompts, resample):
    """A plain forward with a hook replacing a middle write leaves every earlier write bit-identical;
    the library's localisation reports exactly 0 for every component not downstream."""
    C = 2 * model.n_layers
    m = 2 if C > 3 else 1  # attention of layer 1
    i, src = 0, int(resample.patch_index[0, 0])
    clean = capture(family, model, prompts, i)
    patched = capture(family, model, prompts, i, patch=(divmod(m, 2), capture(family, model, prompts, src)["write"][divmod(m, 2)]))
    for c in range(m):
        assert torch.equal(patched["write"][divmod(c, 2)], clean["write"][divmod(c, 2)]), c
    assert not torch.equal(patched["write"][divmod(m, 2)], clean["write"][divmod(m, 2)])
    loc = hc.localisation(resample)
    up = loc[loc["position"] == "upstream"]
    assert len(up) and (up["readout_layer"] * 2 + (up["readout_kind"] == "mlp")
                        <= up["ablated_layer"] * 2 + (up["ablated_kind"] == "mlp") + 1).all()
    strictly = up[up["readout_layer"] * 2 + (up["readout_kind"] == "mlp")
                  < up["ablated_layer"] * 2 + (up["ablated_kind"] == "mlp")]
    assert (strictly["abs_delta_de"] == 0).all() and (strictly["mean_delta_de"] == 0).all()
    # a parallel-residual block's MLP is computed in the pass and still does not move
    same = up[(up["readout_layer"] == up["ablated_layer"]) & (up["readout_kind"] == "mlp")]
    assert len(same) == (model.n_layers if model.parallel_residual else 0)
    assert (same["abs_delta_de"] <= tol(model)).all()
    down = loc[loc["position"] == "downstream"]
    assert down["abs_delta_de"].max() > 1e-4


def test_localisation_summary_by_hand():
    res = synthetic_result(n=6, L=5, P=2)
    loc = hc.localisation(res)
    dde = res.delta_de.mean(2).abs().mean(0)  # [ablated, readout]
    s = hc.localisation_summary(loc)
    row = s[(s["ablated"] == "A1") & (s["readout_kind"] == "attn")].iloc[0]
    vals = np.array([float(dde[2, 2 * l]) for l in range(2, 5)])  # A2, A3, A4
    top = np.sort(vals)[::-1]
    assert row["n_downstream"] == 3 and row["top"] == f"A{2 + int(vals.argmax())}"
    assert row["share_top1"] == pytest.approx(top[0] / vals.sum())
    assert row["share_top2"] == pytest.approx(top[:2].sum() / vals.sum())
    assert row["uniform"] == pytest.approx(1 / 3) and row["first"] == "A2"
    allrow = s[(s["ablated"] == "A1") & (s["readout_kind"] == "all")].iloc[0]
    assert allrow["n_downstream"] == 7  # M1..M4, A2..A4 (sequential blocks)
    share, uniform = hc.prompt_top_share(res)
    per = res.delta_de.mean(2).abs()
    cols = [2 * l for l in range(2, 5)]
    exp = (per[:, 2][:, cols].max(1).values / per[:, 2][:, cols].sum(1)).numpy()
    assert len(share) == 6 * 3  # A0, A1, A2 have at least two later attention layers
    np.testing.assert_allclose(share[6:12], exp)
    np.testing.assert_allclose(uniform, np.repeat([1 / 4, 1 / 3, 1 / 2], 6))


# -- noise beside resample, Fig 7b and Fig 8 -----------------------------------------------------------
def test_ablation_comparison_by_hand(model, prompts, resample):
    noise = hydra_effect(model, prompts, ablation="noise", n_patches=2, noise_scale=3.0, progress=False)
    comp = hc.ablation_comparison({"resample": resample, "noise": noise})
    assert len(comp) == 2 * resample.clean_de.shape[1]
    d = resample.downstream()
    for name, r in (("resample", resample), ("noise", noise)):
        row = comp[(comp["ablation"] == name) & (comp["label"] == "A0")].iloc[0]
        lost = -(r.ablated_de[:, 0, :, 0] - r.clean_de[:, None, 0])
        ce = (r.delta_de[:, 0] * d[0]).sum(-1)
        assert row["lost"] == pytest.approx(float(lost.mean()))
        assert row["compensation"] == pytest.approx(float(ce.mean()))
        assert row["abs_total_effect"] == pytest.approx(float(r.delta_logit[:, 0].abs().mean()))
        assert row["slope"] == pytest.approx(fit_line(lost.reshape(-1), ce.reshape(-1))[0])


def test_fig8_selection_and_fits():
    assert hc.panel_layers(18) == [0, 5, 11, 16]
    assert hc.panel_layers(32) == [0, 10, 20, 30]
    assert hc.panel_layers(2) == [0] and hc.panel_layers(1) == [0]
    res = synthetic_result(n=9, L=8, P=2)
    eff = effects_frame(res)
    reg = regression(eff)
    best = hc.best_layer_points(eff, reg)
    attn = reg[reg["kind"] == "attn"]
    assert best["layer"].nunique() == 1 and best["layer"].iloc[0] == attn.loc[attn["r2"].idxmax(), "layer"]
    assert len(best) == 9 and best["r2"].iloc[0] == pytest.approx(attn["r2"].max())
    panels = hc.layer_panels(eff, hc.panel_layers(8))
    assert sorted(panels["layer"].unique()) == [0, 2, 4, 6] and set(panels["part"]) == {"attention", "MLP"}
    g = eff[(eff["kind"] == "attn") & (eff["layer"] == 4)]
    p = panels[(panels["layer"] == 4) & (panels["part"] == "MLP")]
    assert p["slope"].iloc[0] == pytest.approx(fit_line(g["direct_effect"], g["ce_mlp"])[0])
    np.testing.assert_allclose(p["fit"], p["slope"] * p["direct_effect"] + p["intercept"])
    empty = hc.best_layer_points(eff, reg.assign(r2=np.nan))
    assert isinstance(empty, pd.DataFrame) and not len(empty)


# -- the chapter's computed paragraphs -------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_chapter(tmp_path_factory):
    from selfrepair.chapters import hydra as chapter
    cfg = chapter.Config.from_params(model="tiny-llama", dtype="float64", n_prompts=6, n_patches=2,
                                     noise_scale=2.0, n_noise=2, cache_dir=str(tmp_path_factory.mktemp("c")))
    return cfg, chapter.measure(cfg, progress=False)


def test_chapter_controls_text_shows_the_computed_numbers(tiny_chapter):
    from selfrepair.chapters import hydra as chapter
    cfg, ch = tiny_chapter
    assert ch.noise.meta["noise_scale"] == 2.0 and ch.noise.ablated_de.shape[2] == 2
    own_md = chapter.own_markdown(ch)
    s = ch.own_summary.set_index("ablation")
    for name in ("resample", "resample (every source)", "mean", "noise"):
        assert f"{s.loc[name, 'ratio']:.0%}" in own_md or f"{s.loc[name, 'patch_ratio']:.0%}" in own_md, name
    assert "σ = 2 ×" in own_md and "Zero**: 0%" in own_md
    noise_md = chapter.noise_markdown(ch)
    c = ch.comparison[ch.comparison["kind"] == "attn"]
    for name in ("resample", "noise"):
        assert f"{c[c['ablation'] == name]['abs_total_effect'].mean():.3f}" in noise_md
    # issue 25: every change has its unit, three significant digits and its scale (not "rises by 30.781")
    from selfrepair.chapters.hydra_text import clean_size, times
    from selfrepair.chapters.signed import changes
    clean = clean_size(ch)
    assert np.isfinite(clean) and f"clean direct effect is {clean:.3g} logits in size" in noise_md
    assert "the ablated run's value minus the clean run's" in noise_md
    for name in ("resample", "noise"):
        g = c[c["ablation"] == name]
        for x in (-g["lost"].mean(), g["compensation"].mean()):
            assert changes(x, ".3g", unit=" logits") + times(x, clean) in noise_md, name
    assert times(30.781, 0.5) == " (62 times that clean size)" and times(0.01, 0.5) == " (2% of that clean size)"
    # issue 25: one number for how much the later layers give back. The noise section (a control) and
    # Which σ? state no slope: the pooled and the per-patch slope are lines of the one fold, each
    # saying what it measures and why it differs from the headline share
    pooled, per_patch = ch.numbers["slope_mid"], chapter.patch_slope(ch)
    assert np.isfinite(pooled) and np.isfinite(per_patch)
    scale_md = chapter.scale_markdown(ch)
    for text in (noise_md, scale_md):
        assert "per logit removed" not in text and "pooled slope" not in text and "give back" not in text
        assert number(per_patch, ".2f") not in text and ch.estimates.pooled["clean"].prose(".2f") not in text
    fold = repr(chapter.other_readings(ch))
    assert f"The per-patch slope: {number(per_patch, '.2f')}." in fold
    assert f"The pooled slope over the middle layers: {ch.estimates.pooled['clean'].prose('.2f')}." in fold
    b = ch.best.iloc[0]
    assert f"The slope at the best-fitting layer, {b['label']}: {number(b['slope'], '.2f')}." in fold
    assert f"slope {number(b['slope'], '.2f')}" not in chapter.panels_markdown(ch)  # Fig 7b's slope: in the fold only
    assert np.isnan(chapter.patch_slope(dataclasses.replace(ch, comparison=None)))
    assert "per-patch slope" not in repr(chapter.other_readings(dataclasses.replace(ch, comparison=None)))
    full = ch.attention_localisation
    short = chapter.local_table(ch, n=3)  # the rows that change most, every row folded
    assert len(short.top.frame) == 3 and len(short.every.frame) == len(full) > 3
    assert list(short.top.frame["total_abs_delta_de"]) == sorted(full["total_abs_delta_de"], reverse=True)[:3]
    page = short._repr_html_()
    assert page.count("<tr>") >= 3 + len(full) + 2
    # one fold, under a readable title, holding every column: no second fold of columns inside it
    # (the old one repeated the ablated layer as an index and a kind), kinds of layer in words
    assert page.count("<details") == 1 and "first later layer" in page and "ablated layer (index)" not in page
    assert set(short.every.frame["readout_kind"]) == {"attention", "MLP"}
    loc_md = chapter.localisation_markdown(ch)
    mlp = ch.attention_localisation[(ch.attention_localisation["readout_kind"] == "mlp")
                                    & (ch.attention_localisation["n_downstream"] >= 2)]
    assert f"{mlp['share_top1'].mean():.0%}" in loc_md and "is 0 —" in loc_md
    attn = ch.attention_localisation[(ch.attention_localisation["readout_kind"] == "attn")
                                     & (ch.attention_localisation["n_downstream"] >= 2)]
    if math.isfinite(ch.estimates.local.value):  # read3 #19: one share in the text (the verdict's), the other folded
        said, fold = loc_md.split("<details", 1)
        assert f"carries {1 - ch.estimates.local.value:.0%} of their change, pooled" in said
        assert f"a mean {attn['share_top1'].mean():.0%}" in fold
    panels_md = chapter.panels_markdown(ch)
    assert f"R² = {number(ch.best['r2'].iloc[0], '.2f')}" in panels_md and ch.best["label"].iloc[0] in panels_md
    assert set(ch.attention_localisation["ablated_kind"]) == {"attn"}
    assert set(ch.attention_localisation["readout_kind"]) == {"attn", "mlp"}
    for text in (own_md, noise_md, loc_md, panels_md):
        assert "nan" not in text.lower().split()


def test_chapter_rejects_a_negative_noise_scale():
    from selfrepair.chapters import hydra as chapter
    with pytest.raises(InputError, match="noise_scale must be at least 0"):
        chapter.Config.from_params(model="tiny-llama", noise_scale=-1.0)
    with pytest.raises(InputError, match="n_noise must be at least 1"):
        chapter.Config.from_params(model="tiny-llama", n_noise=0)


def test_the_more_predictive_part_is_named_only_where_it_predicts_something():
    """Fig 8's parts: 0.01 against 0.00 is no 'more predictive' part; 0.30 against 0.05 is."""
    from selfrepair.chapters.hydra_text import PREDICTS, _predictive

    rows = [(5, "attention", 0.5, 0.00), (5, "MLP", 0.4, 0.01), (9, "attention", 0.2, 0.05), (9, "MLP", 0.9, 0.30),
            (11, "attention", 0.7, 0.40), (11, "MLP", 0.1, 0.20)]
    fits = (pd.DataFrame(rows, columns=["layer", "part", "slope", "r2"]).groupby(["layer", "part"])
            [["slope", "r2"]].first().unstack("part"))
    text = _predictive(fits)
    assert "the MLP part has the higher R² at layer 9;" in text and "the attention part at layer 11;" in text
    assert f"at layer 5 neither part predicts compensation (both R² below {PREDICTS:.2f})" in text


def test_chapter_prose_prints_the_tables_minus_sign(tiny_chapter):
    """Issue 25: chapter 5's sentences printed about a dozen numbers with the hyphen ("mean Δ_ablate
    -0.786", "MLP -0.86", "adds a mean -0.012 logits"): each prints the tables' minus sign
    (rules.number), or, where a signed quantity is said, words of its sign (rules.Signed). Read on
    the tiny run, and again with every such number made negative."""
    from test_prose import hyphen_minus_numbers

    from selfrepair.chapters import hydra as chapter
    from selfrepair.chapters import hydra_claims as hcl
    from selfrepair.claims import render_claim

    _, ch = tiny_chapter
    flipped = dataclasses.replace(
        ch, own_summary=ch.own_summary.assign(mean_ablated=-0.25, mean_clean=-0.5),
        comparison=ch.comparison.assign(total_effect=-0.786, slope=-0.3),
        panels=ch.panels.assign(slope=-0.86), best=ch.best.assign(slope=-0.03),
        numbers={**ch.numbers, "corr": -0.4, "lost_mid": -0.2, "block_mid": -0.012})

    def prose(c) -> str:
        verdicts = hcl.verdicts(c)
        return "\n".join([chapter.own_markdown(c), chapter.noise_markdown(c), chapter.localisation_markdown(c),
                          chapter.panels_markdown(c), repr(chapter.other_readings(c)), chapter.scale_markdown(c),
                          chapter.seen(c), *(render_claim(verdicts, v.claim.key) for v in verdicts)])

    for c in (ch, flipped):
        text = prose(c)
        assert not hyphen_minus_numbers(text), hyphen_minus_numbers(text)
    text = prose(flipped)
    assert "its mean change, Δ<sub>ablate</sub>, is −0.786" in text and "MLP −0.86" in text and "r = −0.40" in text
    assert "the mean own direct effect is −0.250 logits against −0.500 clean" in text
    assert "An ablation there adds a mean 0.200 logits of direct effect" in text
    assert "The per-patch slope: −0.30." in text and ": −0.03." in text
