"""Chapter 03's claims on the uncertainty layer (selfrepair.erasure, selfrepair.chapters.neurons_claims):
each neuron's clean direct effect on the distribution against a direct computation, and the
verdicts against pandas by hand on synthetic results with correlated documents; replicates
recompute each head's shares on resampled documents; the halves are disjoint and the selections
blind to the test half; every rule's outcomes printed as described."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
import torch

from claim_checks import check_outcomes, resampled
from selfrepair import erasure as er
from selfrepair import load_model, neurons as nr
from selfrepair.batch import TokenSet, clean_batch
from selfrepair.chapters import neurons as cn
from selfrepair.chapters import neurons_claims as nc
from selfrepair.claims import WORDS
from selfrepair.direct_effect import direct_effects
from selfrepair.results import head_label
from selfrepair.uncertainty import Bootstrap, Clusters


# -- each neuron on the distribution ---------------------------------------------------------------
@pytest.mark.parametrize("family", ["gpt2", "gemma3"])
def test_baseline_counts_and_sample_are_the_clean_neuron_effects(family):
    m = load_model("tiny-" + family, dtype="float64")
    g = torch.Generator().manual_seed(0)
    tok = torch.randint(0, m.d_vocab, (6, 9), generator=g)
    L = m.n_layers - 1
    base = er.measure_baseline(m, TokenSet.from_tensor(tok), sample_size=20, seed=3, batch_size=4,
                               progress=False)
    batch = clean_batch(m, tok, neuron_layers=(L,))
    de = direct_effects(m, tok, batch.clean, batch.readout, neuron_layers=(L,)).neurons[L]  # [d_mlp, b, p]
    assert torch.equal(base.negative, (de < 0).sum(-1).T.cpu())
    assert (base.positions == 8).all() and base.neuron_layer == L
    assert len(base.instance) == 20 and base.instance.unique().numel() == 20
    torch.testing.assert_close(base.sample, de.flatten(1).T[base.instance].cpu(), atol=1e-12, rtol=0)
    again = er.measure_baseline(m, tok, sample_size=20, seed=3, batch_size=6, progress=False)
    assert torch.equal(again.instance, base.instance) and torch.equal(again.negative, base.negative)
    np.testing.assert_allclose(base.medians().numpy(), np.median(base.sample.numpy(), 0))


def test_median_sign_is_the_majority_sign():
    """A neuron's median over some tokens is negative exactly when more than half of them are."""
    rng = np.random.default_rng(0)
    for _ in range(50):
        x = rng.normal(rng.normal(), 1, (int(rng.integers(1, 30)) * 2 + 1, 5))  # odd counts: one median
        t = np.r_[len(x), (x < 0).sum(0)][None].astype(float)
        assert (er.erasure_neurons(t)[0] == (np.median(x, 0) < 0)).all()


# -- synthetic results -------------------------------------------------------------------------------
def synthetic(seed=0, n_heads=3, d_mlp=24, n_docs=24, seq1=5, k=40) -> dict:
    """A NeuronResult and its baseline on documents of 1-3 rows: neurons 0-7 erase (mostly negative
    clean DE) and repair more than the rest; each document shifts its tokens' values together."""
    rng = np.random.default_rng(seed)
    doc_of_row = np.repeat(np.arange(n_docs), rng.integers(1, 4, n_docs))
    n_rows = len(doc_of_row)
    shift = rng.normal(0, 0.3, n_docs)
    mean = np.where(np.arange(d_mlp) < 8, -0.4, 0.1)
    data = {}
    for sel in nr.SELECTIONS:
        inst = np.stack([rng.permutation(n_rows * seq1)[:k] for _ in range(n_heads)])
        s = shift[doc_of_row[inst // seq1]][..., None]
        clean = rng.normal(mean, 0.5, (n_heads, k, d_mlp)) + s
        delta = rng.normal(0.02 + 0.1 * (mean < 0), 0.1, (n_heads, k, d_mlp)) + 0.05 * s
        de = rng.normal(0.8, 0.6, (n_heads, k))
        t = {"instance": inst, "clean": clean, "delta": delta, "direct_effect": de,
             "ablated_direct_effect": de * 0.1, "delta_logit": -0.5 * de, "self_repair": 0.4 * de,
             "layer_clean": clean.sum(-1) + 1.0, "layer_delta": delta.sum(-1)}
        data.update({f"{sel}/{q}": torch.tensor(v) for q, v in t.items()})
    res = nr.NeuronResult([(0, h) for h in range(n_heads)], 1, data,
                          meta={"seq_len": seq1 + 1, "d_mlp": d_mlp, "k": k, "model": "synthetic",
                                "ablation": "resample", "top_percent": 2.0})
    clean_all = rng.normal(mean, 0.5, (n_rows, seq1, d_mlp)) + shift[doc_of_row][:, None, None]
    picks = np.sort(rng.permutation(n_rows * seq1)[:50])
    base = er.NeuronBaseline(1, torch.tensor((clean_all < 0).sum(1)), torch.full((n_rows,), seq1),
                             torch.tensor(clean_all.reshape(-1, d_mlp)[picks]), torch.tensor(picks))
    return {"res": res, "baseline": base, "doc_of_row": doc_of_row, "clean_all": clean_all}


def chapter(run: dict, fig7="L0H0", fig8=("L0H1", "L0H2"), n_boot=200, seed=0) -> cn.NeuronsChapter:
    res = run["res"]
    heads = pd.DataFrame({"figure": ["Fig 7, §4.2.2"] + ["Fig 8, App. C"] * len(fig8), "label": [fig7, *fig8]})
    ch = cn.NeuronsChapter(res, nr.summary(res), heads, fig7, list(fig8), [], dict(res.meta), run["baseline"],
                           n_boot=n_boot, seed=seed)
    ch.evidence = cn.chapter_evidence(ch, Clusters.documents(run["doc_of_row"]))
    ch.verdicts = cn.verdicts(ch)
    return ch


def frames(res) -> dict[str, pd.DataFrame]:
    """Per selection, one row per (head, kept token): row, DE, and the neuron vectors as arrays."""
    seq1 = res.meta["seq_len"] - 1
    out = {}
    for sel in nr.SELECTIONS:
        parts = []
        for i, (l, h) in enumerate(res.heads):
            inst = res.get(sel, "instance")[i].numpy()
            parts.append(pd.DataFrame({"label": head_label(l, h), "row": inst // seq1,
                                       "de": res.get(sel, "direct_effect")[i].numpy(),
                                       "clean": list(res.get(sel, "clean")[i].numpy()),
                                       "delta": list(res.get(sel, "delta")[i].numpy())}))
        out[sel] = pd.concat(parts, ignore_index=True)
    return out


def expected(f: dict, negative: pd.DataFrame, fig8, cluster_of_row, select, test) -> dict:
    """Chapter 3's metrics by hand: Fig 7 and Fig 8 as means over heads of per-head shares; erasure
    and varies selected on the ``select`` clusters and read on the ``test`` ones. ``negative``:
    per row, ``positions`` and the negative counts per neuron (columns 0..d_mlp-1)."""
    out = {}
    m = f["mlp_repair"]
    top = m["delta"].map(np.argmax)
    hit = [(c[t] < 0) and (d[t] > 0) for c, d, t in zip(m["clean"], m["delta"], top)]
    out["anti_erasure"] = m.assign(hit=hit).groupby("label")["hit"].mean().mean()
    d = f["direct_effect"][f["direct_effect"]["label"].isin(fig8) & (f["direct_effect"]["de"] > 0)]
    hit = [delta.max() >= 0.1 * de for delta, de in zip(d["delta"], d["de"])]
    out["sparse"] = d.assign(hit=hit).groupby("label")["hit"].mean().mean()
    in_a = np.isin(np.asarray(cluster_of_row), select)
    d = f["direct_effect"]
    excess = []
    for label in fig8:
        g = d[(d["label"] == label) & in_a[d["row"]]]
        ranked = np.argsort(-np.sum(np.stack(g["delta"]), 0), kind="stable")[:10]
        b = negative[~in_a[negative.index]]
        erasing = b.drop(columns="positions").sum(0).to_numpy() > 0.5 * b["positions"].sum()
        excess.append(erasing[ranked].mean() - erasing.mean())
    out["erasure"] = float(np.mean(excess))
    s = f["self_repair"]
    counts = {}
    for label, g in s[in_a[s["row"]]].groupby("label", sort=False):
        tops = np.stack([np.argsort(-x, kind="stable")[:10] for x in g["delta"]])
        freq = np.bincount(tops.ravel(), minlength=len(g["delta"].iloc[0])) / len(g)
        counts[label] = (freq.max(), int(freq.argmax()))
    label = max(counts, key=lambda k: counts[k][0])
    n = counts[label][1]
    g = s[(s["label"] == label) & ~in_a[s["row"]]]
    out["varies"] = np.mean([n in np.argsort(-x, kind="stable")[:10] for x in g["delta"]])
    return out


def negative_frame(base) -> pd.DataFrame:
    return pd.DataFrame(base.negative.numpy()).assign(positions=base.positions.numpy())


@pytest.mark.parametrize("seed", range(3))
def test_verdicts_on_synthetic_results(seed):
    run = synthetic(seed)
    ch = chapter(run, seed=seed)
    got = {v.claim.key: v for v in ch.verdicts}
    assert [v.claim for v in ch.verdicts] == list(cn.CLAIMS)
    cl = ch.evidence.clusters
    select, test = cl.halves(seed)
    want = expected(frames(run["res"]), negative_frame(run["baseline"]), ch.fig8, cl.of_row, select, test)
    for key, value in want.items():
        assert got[key].value == pytest.approx(value), key
        e = got[key].estimate
        assert (e.seed, e.n_boot, e.cluster_unit) == (seed, 200, "documents"), key
        assert e.clusters == (len(test) if key in ("erasure", "varies") else cl.n), key
        assert got[key].word == WORDS[got[key].claim.rule.decide(got[key].lo, got[key].hi)], key
    assert (got["anti_erasure"].n, got["sparse"].n, got["erasure"].n) == (3, 2, 20)
    # the synthetic erasure neurons repair more than the rest: over-represented among the top
    assert got["erasure"].word == "holds"


def test_selections_are_blind_to_the_test_half_which_is_what_is_tested():
    """The halves are disjoint and cover every document; changing the test half's neurons changes
    neither the ranked neurons nor the picked (head, neuron), and the verdicts read the change."""
    run = synthetic(1)
    ch = chapter(run, seed=1)
    ev = ch.evidence
    select, test, top = nc.erasure_selection(ev, 1)
    _, _, pick = nc.varies_selection(ev, 1)
    assert not set(select) & set(test) and set(select) | set(test) == set(range(ev.clusters.n))
    res, seq1 = run["res"], run["res"].meta["seq_len"] - 1
    in_test = np.isin(ev.clusters.of_row, test)
    d_mlp = res.meta["d_mlp"]
    for sel in nr.SELECTIONS:  # on every test-half token neuron n repairs n: the top ten are the last ten
        rows = torch.tensor(in_test[(res.get(sel, "instance") // seq1).numpy()])
        res.data[f"{sel}/delta"][rows] = torch.arange(d_mlp, dtype=torch.float64)
    base = run["baseline"]
    base.negative[torch.tensor(in_test)] = 0  # and no neuron is negative there
    again = chapter(run, seed=1)
    s2, t2, top2 = nc.erasure_selection(again.evidence, 1)
    assert np.array_equal(top2, top) and np.array_equal(s2, select) and np.array_equal(t2, test)
    assert nc.varies_selection(again.evidence, 1)[2] == pick
    v = {x.claim.key: x for x in again.verdicts}
    assert v["erasure"].value == 0  # no erasure neuron on the test half
    assert v["varies"].value == (1.0 if pick[1] >= d_mlp - 10 else 0.0)


def test_a_replicate_recomputes_each_heads_shares_on_resampled_documents():
    run = synthetic(2)
    ch = chapter(run)
    ev, f = ch.evidence, frames(run["res"])
    boot = Bootstrap.over(ev.clusters, 30, 0)
    anti = boot.replicates(er.mean_share, ev.anti)
    heavy = boot.replicates(er.mean_share, ev.heavy)
    for i in (0, 3, 11):
        w = boot.weights[i]
        r = {sel: resampled(fr, ev.clusters.of_row, w) for sel, fr in f.items()}
        m = r["mlp_repair"]
        t = m["delta"].map(np.argmax)
        hit = [(c[j] < 0) and (d[j] > 0) for c, d, j in zip(m["clean"], m["delta"], t)]
        assert anti[i] == pytest.approx(m.assign(hit=hit).groupby("label")["hit"].mean().mean())
        d = r["direct_effect"]
        d = d[d["label"].isin(ch.fig8) & (d["de"] > 0)]
        hit = [x.max() >= 0.1 * de for x, de in zip(d["delta"], d["de"])]
        assert heavy[i] == pytest.approx(d.assign(hit=hit).groupby("label")["hit"].mean().mean())
    # the erasure test: each replicate re-decides which neurons are erasure neurons on its documents
    select, test, top = nc.erasure_selection(ev, 0)
    half = Bootstrap(len(test), 30, 0, ev.clusters.unit)
    reps = half.replicates(lambda t: er.erasure_excess(t, top), ev.negative[test])
    neg = negative_frame(run["baseline"]).assign(row=np.arange(len(ev.clusters.of_row)))
    for i in (0, 5, 9):
        b = resampled(neg, ev.clusters.of_row, half.weights[i], clusters=test)
        erasing = b.drop(columns=["positions", "row"]).sum(0).to_numpy() > 0.5 * b["positions"].sum()
        assert reps[i] == pytest.approx(np.mean([erasing[t].mean() for t in top]) - erasing.mean())
    assert np.unique(anti[1:]).size > 1


@pytest.mark.parametrize("claim", cn.CLAIMS, ids=lambda c: c.key)
def test_every_outcome_of_every_rule_is_printed_as_it_is_described(claim):
    check_outcomes(claim)


def test_too_few_documents_cannot_tell_and_say_why():
    for v in chapter(synthetic(0, n_docs=6)).verdicts:
        assert v.word == "cannot tell" and "independent documents" in v.why, v.claim.key


def test_figures_colour_neurons_by_their_median_on_the_distribution():
    run = synthetic(0)
    ch = chapter(run)
    med = np.median(run["baseline"].sample.numpy(), 0)
    cum = ch.cumulative
    np.testing.assert_allclose(cum["median_clean_de"], med[cum["neuron"]])
    top = ch.top_frequency
    np.testing.assert_allclose(top["median_clean_de"], med[top["neuron"]])
    # not the median over the head's own selected tokens
    assert not np.allclose(cum["median_clean_de"], nr.cumulative(run["res"])
                           .query("label in @ch.fig8")["median_clean_de"])


def test_the_most_consistent_neuron_is_named_by_its_mlp_layer_not_a_head():
    """Issue 25: "neuron 1026 of L17H3" — a neuron belongs to an MLP layer; the head is the one it
    repairs."""
    ch = chapter(synthetic(0))
    detail = {v.claim.key: v for v in ch.verdicts}["varies"].detail
    layer = ch.result.neuron_layer
    _, _, (h, n, _) = nc.varies_selection(ch.evidence, ch.seed)
    assert f"It is neuron {n} of layer {layer}'s MLP, among the ten that repair {head_label(*ch.evidence.heads[h])} most" in detail
    assert not re.search(r"neuron \d+ of L\d+H\d+", detail)
    assert re.search(rf"\(neuron \d+ of layer {layer}'s MLP, repairing L\d+H\d+\)", detail)
