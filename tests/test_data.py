"""Tests for selfrepair.data: loading corpora, packing tokens, resample sources, prompts."""
from __future__ import annotations

import json
import time

import datasets
import huggingface_hub.constants
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from selfrepair.data import (EMBEDDED_CORPUS, DataError, corrupt_tokens, dataset_fingerprint, load_corpus,
                             load_prompts, pack, pack_documents, pack_tokens, pack_windows, prompt_tokens,
                             resample_sources, same_document_rows, tiny_corpus)


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over tiny_corpus' vocabulary (no downloads)."""
    words = sorted({w for doc in tiny_corpus(256)["text"] for w in doc.lower().replace(".", " .").split()})
    vocab = {w: i for i, w in enumerate(["<pad>", "<bos>", "<eos>", "<unk>", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>")


# ----------------------------------------------------------------------------- pack_tokens
def test_pack_shapes_and_bos(tokenizer):
    tokens = pack_tokens(tiny_corpus(), tokenizer, n_tokens=100, seq_len=16, progress=False)
    assert tokens.dtype == torch.long and tokens.shape == (7, 16)  # ceil(100 / 16) rows
    assert (tokens[:, 0] == tokenizer.bos_token_id).all()
    assert not (tokens[:, 1:] == tokenizer.unk_token_id).any()


def test_pack_is_a_contiguous_eos_separated_stream(tokenizer):
    corpus = tiny_corpus(8)
    tokens = pack_tokens(corpus, tokenizer, n_tokens=40, seq_len=10, seed=3, progress=False)
    body = tokens[:, 1:].reshape(-1).tolist()
    order = torch.randperm(8, generator=torch.Generator().manual_seed(3)).tolist()
    stream = []
    for i in order:
        stream += tokenizer(corpus["text"][i], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert body == stream[:len(body)]


def test_pack_deterministic_by_seed(tokenizer):
    corpus = tiny_corpus()
    a = pack_tokens(corpus, tokenizer, n_tokens=256, seq_len=32, seed=1, progress=False)
    b = pack_tokens(corpus, tokenizer, n_tokens=256, seq_len=32, seed=1, progress=False)
    c = pack_tokens(corpus, tokenizer, n_tokens=256, seq_len=32, seed=2, progress=False)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_pack_accepts_list_of_strings_and_explicit_bos(tokenizer):
    tokens = pack_tokens(list(tiny_corpus(8)["text"]), tokenizer, n_tokens=20, seq_len=10,
                         bos_token_id=0, progress=False)
    assert tokens.shape == (2, 10) and (tokens[:, 0] == 0).all()


def test_pack_too_few_tokens(tokenizer):
    with pytest.raises(DataError, match="corpus too small"):
        pack_tokens(tiny_corpus(2), tokenizer, n_tokens=10_000, seq_len=64, progress=False)


def test_pack_missing_column_and_bad_lengths(tokenizer):
    with pytest.raises(DataError, match=r"available columns: \['text', 'pile_set_name'\]"):
        pack_tokens(tiny_corpus(4), tokenizer, n_tokens=10, seq_len=8, text_column="body")
    with pytest.raises(DataError, match="seq_len >= 2"):
        pack_tokens(tiny_corpus(4), tokenizer, n_tokens=10, seq_len=1)


def test_pack_records_the_documents_of_every_row(tokenizer):
    corpus = tiny_corpus(16)
    packed = pack_documents(corpus, tokenizer, n_tokens=300, seq_len=12, seed=4, progress=False)
    assert torch.equal(packed.tokens, pack_tokens(corpus, tokenizer, n_tokens=300, seq_len=12, seed=4,
                                                  progress=False))
    order = torch.randperm(16, generator=torch.Generator().manual_seed(4)).tolist()
    doc_of = []  # which document (in packing order) each stream token belongs to, EOS included
    for d, i in enumerate(order):
        doc_of += [d] * (len(tokenizer(corpus["text"][i], add_special_tokens=False)["input_ids"]) + 1)
    body = 11
    for r in range(len(packed.tokens)):
        span = doc_of[r * body:(r + 1) * body]
        assert (packed.doc_first[r], packed.doc_last[r]) == (span[0], span[-1])
        counts = {d: span.count(d) for d in span}  # the document holding most of the row (ties: earlier)
        assert packed.doc_main[r] == min(counts, key=lambda d: (-counts[d], d))
    assert len(set(packed.doc_main.tolist())) > 1 and (packed.doc_main.diff() >= 0).all()


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_one_window_per_document(tokenizer):
    """packing='document': every row is BOS then a contiguous window of one document, no document
    twice, documents shorter than the window passed over, the offsets reproducible from the seed."""
    corpus = tiny_corpus(40)
    texts = corpus["text"]
    packed = pack_windows(corpus, tokenizer, n_tokens=12 * 10, seq_len=12, seed=5, progress=False)
    assert packed.tokens.shape == (10, 12) and (packed.tokens[:, 0] == tokenizer.bos_token_id).all()
    assert torch.equal(packed.doc_first, packed.doc_last) and torch.equal(packed.doc_first, packed.doc_main)
    assert len(set(packed.doc_main.tolist())) == 10 and (packed.doc_main.diff() > 0).all()
    order = torch.randperm(40, generator=torch.Generator().manual_seed(5)).tolist()
    for row, d in zip(packed.tokens, packed.doc_main.tolist()):
        ids, window = _ids(tokenizer, texts[order[d]]), row[1:].tolist()
        assert any(ids[k:k + 11] == window for k in range(len(ids) - 10)), d
    skipped = [d for d in range(int(packed.doc_main[-1])) if d not in packed.doc_main.tolist()]
    assert all(len(_ids(tokenizer, texts[order[d]])) < 11 for d in skipped)
    again = pack_windows(corpus, tokenizer, n_tokens=120, seq_len=12, seed=5, progress=False)
    other = pack_windows(corpus, tokenizer, n_tokens=120, seq_len=12, seed=6, progress=False)
    assert torch.equal(again.tokens, packed.tokens) and not torch.equal(other.tokens, packed.tokens)


def test_pack_dispatches_and_too_few_documents_says_what_to_do(tokenizer):
    corpus = tiny_corpus(16)
    kw = dict(n_tokens=300, seq_len=12, seed=4, progress=False)
    assert torch.equal(pack(corpus, tokenizer, packing="concatenate", **kw).tokens,
                       pack_documents(corpus, tokenizer, **kw).tokens)
    with pytest.raises(DataError, match="corpus too small for packing=.document., which needs one document of at least 11 tokens per row.*packing='concatenate'"):
        pack(corpus, tokenizer, packing="document", **kw)  # 25 rows, 16 documents
    with pytest.raises(DataError, match="packing must be one of"):
        pack(corpus, tokenizer, packing="windows", **kw)


def test_document_packing_makes_every_row_its_own_cluster():
    """The corpus chapters' default: rows from distinct documents, so the cluster bootstrap resamples
    rows; the cache fingerprint names the packing only when it is not the concatenation that came
    first (whose entries keep their keys)."""
    from selfrepair.chapters.existence import Config
    from selfrepair.experiment import open_model, open_tokens
    from selfrepair.uncertainty import Clusters

    cfg = Config.from_params(model="tiny-gpt2", dataset="tiny", n_tokens=4096, seq_len=32)
    assert cfg.packing == "document"
    data = open_tokens(cfg, open_model(cfg), progress=False)
    assert Clusters.documents(data.main_document.numpy()).n == len(data) == 128
    assert data.same_document == 0 and data.fingerprint["packing"] == "document"
    assert "n_docs=512" in data.fingerprint["corpus"]
    joined = Config.from_params(model="tiny-gpt2", dataset="tiny", n_tokens=4096, seq_len=32,
                                packing="concatenate")
    fp = open_tokens(joined, open_model(joined), progress=False).fingerprint
    assert "packing" not in fp and fp["corpus"] == "generated:tiny_corpus(seed=0)"
    with pytest.raises(Exception, match="packing must be one of 'document', 'concatenate'"):
        Config.from_params(model="tiny-gpt2", packing="windows")


def test_empty_corpus_and_non_text_column_are_one_clear_error(tmp_path, tokenizer):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="empty"):
        load_corpus(empty)
    numbers = tmp_path / "numbers.jsonl"
    numbers.write_text('{"text": 3}\n{"text": 4}\n')
    with pytest.raises(DataError, match="row 0 of the corpus is int.*must hold strings"):
        pack_tokens(load_corpus(numbers), tokenizer, n_tokens=4, seq_len=2, progress=False)
    with pytest.raises(DataError, match="no documents"):
        pack_tokens([], tokenizer, n_tokens=4, seq_len=2, progress=False)


# ----------------------------------------------------------------------------- resample sources
@settings(max_examples=40, deadline=None)
@given(lengths=st.lists(st.integers(1, 120), min_size=2, max_size=30), seq=st.integers(2, 24),
       seed=st.integers(0, 2**31 - 1))
def test_resample_sources_come_from_other_documents(lengths, seq, seed):
    """Synthetic multi-document corpora: every row's source shares no document with it whenever
    such a row exists, and the choice is reproducible from the seed."""
    stream_docs = [d for d, n in enumerate(lengths) for _ in range(n + 1)]  # + EOS
    body = seq - 1
    n_rows = len(stream_docs) // body
    if n_rows < 2:
        return
    first = torch.tensor([stream_docs[r * body] for r in range(n_rows)])
    last = torch.tensor([stream_docs[(r + 1) * body - 1] for r in range(n_rows)])
    source = resample_sources(first, last, seed=seed)
    assert torch.equal(source, resample_sources(first, last, seed=seed))
    docs = [set(stream_docs[r * body:(r + 1) * body]) for r in range(n_rows)]
    for i, j in enumerate(source.tolist()):
        assert i != j
        possible = any(not (docs[i] & docs[k]) for k in range(n_rows))
        if possible:
            assert not (docs[i] & docs[j]), (i, j, docs[i], docs[j])
    assert same_document_rows(first, last, source) == sum(bool(docs[i] & docs[j]) for i, j in enumerate(source.tolist()))


def test_one_document_corpus_resamples_from_a_distant_part():
    n = 40
    one = torch.zeros(n, dtype=torch.long)
    source = resample_sources(one, one, seed=3)
    assert ((source - torch.arange(n)).abs() >= n // 4).all()
    assert same_document_rows(one, one, source) == n
    with pytest.raises(DataError, match="at least 2 rows"):
        resample_sources(one[:1], one[:1])


def test_packed_rows_are_resampled_across_documents():
    """On the token set chapter 1 measures: almost every row rolled by one would share a document
    with its source; with resample_sources none does."""
    from selfrepair.chapters.existence import Config
    from selfrepair.experiment import open_model, open_tokens

    cfg = Config.from_params(model="tiny-gpt2", dataset="tiny", n_tokens=4096, seq_len=32,
                             packing="concatenate")
    data = open_tokens(cfg, open_model(cfg), progress=False)
    assert data.same_document == 0
    rolled = torch.roll(torch.arange(len(data)), 1)
    packed = pack_documents(tiny_corpus(seed=0), open_model(cfg).tokenizer, n_tokens=4096, seq_len=32,
                            progress=False)
    assert same_document_rows(packed.doc_first, packed.doc_last, rolled) > len(data) // 2
    assert torch.equal(data.corrupt_tokens, data.tokens[data.source])


# ----------------------------------------------------------------------------- corrupt_tokens
def test_corrupt_default_is_roll_by_one():
    tokens = torch.arange(12).view(4, 3)
    out = corrupt_tokens(tokens)
    assert torch.equal(out, torch.roll(tokens, 1, 0))
    assert torch.equal(out[1], tokens[0]) and torch.equal(out[0], tokens[3])


@settings(max_examples=50, deadline=None)
@given(batch=st.integers(2, 40), seed=st.integers(0, 2**31 - 1))
def test_corrupt_seeded_is_a_derangement(batch, seed):
    tokens = torch.arange(batch).view(batch, 1).repeat(1, 5)
    out = corrupt_tokens(tokens, seed=seed)
    assert sorted(out[:, 0].tolist()) == list(range(batch))  # a permutation of the rows
    assert not (out[:, 0] == torch.arange(batch)).any()  # with no fixed row
    assert torch.equal(out, corrupt_tokens(tokens, seed=seed))  # deterministic


def test_corrupt_needs_two_rows():
    with pytest.raises(DataError, match="at least 2 rows"):
        corrupt_tokens(torch.zeros(1, 8, dtype=torch.long))
    with pytest.raises(ValueError):
        corrupt_tokens(torch.zeros(1, 8, dtype=torch.long), seed=0)


# ----------------------------------------------------------------------------- load_corpus
def test_load_local_jsonl_and_missing_column(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"body": f"document {i}"}) + "\n" for i in range(3)))
    ds = load_corpus(str(path), text_column="body")
    assert ds.num_rows == 3 and ds[0]["body"] == "document 0"
    with pytest.raises(DataError, match=r"no column 'text'.*available columns: \['body'\]"):
        load_corpus(path)


def test_load_local_directory(tmp_path):
    for i in range(2):
        (tmp_path / f"part{i}.jsonl").write_text(json.dumps({"text": f"doc {i}"}) + "\n")
    assert load_corpus(tmp_path).num_rows == 2


def test_missing_local_path():
    with pytest.raises(DataError, match="does not exist"):
        load_corpus("no/such/file.jsonl")


def test_unknown_hub_dataset_offline(monkeypatch):
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    start = time.monotonic()
    with pytest.raises(DataError) as info:
        load_corpus("selfrepair-tests/no-such-dataset")
    assert time.monotonic() - start < 30
    msg = str(info.value)
    assert "'selfrepair-tests/no-such-dataset'" in msg and "network" in msg and "dataset='embedded'" in msg


def test_missing_embedded_corpus(monkeypatch, tmp_path):
    monkeypatch.setenv("SELFREPAIR_DATA_DIR", str(tmp_path))
    with pytest.raises(DataError, match=r"python scripts/build_corpus.py.*re-clone"):
        load_corpus(EMBEDDED_CORPUS)


def test_embedded_corpus_loads():
    ds = load_corpus()
    assert ds.num_rows > 100
    assert set(ds.column_names) == {"text", "pile_set_name", "source", "license"}
    assert set(ds["pile_set_name"]) == {"Bible-KJV", "DevilsDictionary", "JargonFile", "Python-stdlib",
                                        "DM Mathematics"}


def test_tiny_corpus_deterministic():
    a, b = tiny_corpus(16, seed=5), tiny_corpus(16, seed=5)
    assert a["text"] == b["text"] and a.num_rows == 16 and a["text"] != tiny_corpus(16, seed=6)["text"]


# ----------------------------------------------------------------------------- prompts
def test_load_prompts_file():
    df = load_prompts()
    assert list(df.columns[:4]) == ["subject", "relation", "prompt", "target"]
    assert len(df) >= 150 and df["relation"].nunique() >= 10
    assert df["target"].str.startswith(" ").all() and not df["prompt"].duplicated().any()
    assert not df["prompt"].str.endswith(" ").any()


def test_load_prompts_missing_columns(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("question,answer\nWhere is Paris?, France\n")
    with pytest.raises(DataError, match=r"missing columns \['subject', 'relation', 'prompt', 'target'\]"):
        load_prompts(path)
    with pytest.raises(DataError, match="not found"):
        load_prompts(tmp_path / "none.csv")


def test_load_prompts_rejects_targets_without_space(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("subject,relation,prompt,target\nFrance,capital,The capital of France is,Paris\n")
    with pytest.raises(DataError, match="start with a space"):
        load_prompts(path)


def test_prompt_tokens_right_padded(tokenizer):
    df = pd.DataFrame({"prompt": ["the old dog", "a small red bird near the"], "target": [" sees", " river"]})
    out = prompt_tokens(df, tokenizer)
    assert out.input_ids.shape == (2, 7)
    assert out.last_pos.tolist() == [3, 6]
    assert (out.input_ids[:, 0] == tokenizer.bos_token_id).all()
    assert out.input_ids[0, 4:].tolist() == [tokenizer.pad_token_id] * 3
    assert out.attention_mask.tolist() == [[1, 1, 1, 1, 0, 0, 0], [1] * 7]
    vocab = tokenizer.get_vocab()
    assert out.target_ids.tolist() == [vocab["sees"], vocab["river"]]
    assert out.input_ids[1, out.last_pos[1]] == vocab["the"]


def test_right_padding_leaves_last_position_logits_unchanged(tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=32, n_embd=32, n_layer=2,
                                       n_head=2)).eval()
    df = pd.DataFrame({"prompt": ["the dog", "a small red bird near the"], "target": [" sees", " river"]})
    out = prompt_tokens(df, tokenizer)
    with torch.no_grad():
        batched = model(out.input_ids, attention_mask=out.attention_mask).logits
        alone = model(out.input_ids[:1, :out.last_pos[0] + 1]).logits
    torch.testing.assert_close(batched[0, out.last_pos[0]], alone[0, -1])


@pytest.mark.smoke
def test_embedded_corpus_has_300k_gemma_tokens():
    import transformers

    from selfrepair.models import embedded_checkpoint

    # the tokenizer the book runs with: the one converted from the GGUF once, saved beside the weights
    tok = transformers.AutoTokenizer.from_pretrained(str(embedded_checkpoint()))
    ds = load_corpus()
    n = sum(len(ids) for ids in tok(list(ds["text"]), add_special_tokens=False)["input_ids"])
    assert n >= 300_000, n
    tokens = pack_tokens(ds, tok, n_tokens=300_000, seq_len=1024, progress=False)
    assert tokens.shape == (293, 1024) and (tokens[:, 0] == tok.bos_token_id).all()
    batch = prompt_tokens(load_prompts().head(3), tok)
    assert batch.target_ids.tolist()[0] == tok(" Paris", add_special_tokens=False)["input_ids"][0]


def test_changed_local_corpus_changes_the_cache_key(tmp_path):
    from selfrepair.chapters.existence import Config
    from selfrepair.experiment import open_model, open_tokens

    corpus = tmp_path / "docs.jsonl"
    corpus.write_text('{"text": "one document"}\n')
    cfg = Config(model="tiny-gpt2", dataset=str(corpus))
    model = open_model(cfg)
    before = open_tokens(cfg, model).fingerprint
    assert before["corpus"].startswith("sha256:") and before == open_tokens(cfg, model).fingerprint
    corpus.write_text('{"text": "another document"}\n')
    assert open_tokens(cfg, model).fingerprint["corpus"] != before["corpus"]
    embedded = open_tokens(Config(model="tiny-gpt2"), model).fingerprint["corpus"]
    assert embedded == dataset_fingerprint("embedded") and embedded.startswith("sha256:")
    assert dataset_fingerprint("NeelNanda/pile-10k") == "NeelNanda/pile-10k"
