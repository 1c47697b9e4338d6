"""Data side of training: the embedded corpus, the tokenizer, and the three layouts (blocks, packed pieces, carried
streams). The packing test checks, through the real collator and model, that no state crosses a document."""

import json
import math

import numpy as np
import pytest
import torch

from modeling_fwp import FWPConfig, FWPForCausalLM
from modeling_fwp import data as fwp_data
from modeling_fwp import tokenizer_utils


@pytest.fixture(scope="module")
def corpus():
    return fwp_data.load_raw_datasets()


def test_embedded_corpus_is_split_by_whole_works(corpus):
    titles = {split: set(corpus[split]["title"]) for split in fwp_data.SPLITS}
    assert titles["validation"] == set(fwp_data.HELD_OUT_WORKS["validation"])
    assert titles["test"] == set(fwp_data.HELD_OUT_WORKS["test"])
    assert not (titles["train"] & (titles["validation"] | titles["test"]))
    assert sum(len(t) for t in titles.values()) == 42  # every work once
    assert all(len(text) > 1000 for split in fwp_data.SPLITS for text in corpus[split]["text"])
    hamlet = corpus["validation"]["text"][list(corpus["validation"]["title"]).index("hamlet")]
    assert "To be, or not to be" in hamlet


def test_missing_data_files_name_the_argument(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_file"):
        fwp_data.load_raw_datasets(train_file=str(tmp_path / "missing.txt"))
    (tmp_path / "train.txt").write_text("some text\n")
    with pytest.raises(FileNotFoundError, match="validation_file"):
        fwp_data.load_raw_datasets(train_file=str(tmp_path / "train.txt"),
                                   validation_file=str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="unknown format"):
        (tmp_path / "train.csv").write_text("a,b\n")
        fwp_data.load_raw_datasets(train_file=str(tmp_path / "train.csv"))


def test_local_files_whole_documents_and_held_out_validation(tmp_path):
    docs = [f"document {i}\nwith two lines\n\nand a paragraph" for i in range(10)]
    with open(tmp_path / "train.jsonl", "w") as f:
        for doc in docs:
            f.write(json.dumps({"text": doc}) + "\n")
    raw = fwp_data.load_raw_datasets(train_file=str(tmp_path / "train.jsonl"), validation_split_percentage=20)
    assert len(raw["train"]) == 8 and len(raw["validation"]) == 2
    assert sorted(list(raw["train"]["text"]) + list(raw["validation"]["text"])) == sorted(docs)

    (tmp_path / "a.txt").write_text(docs[0])
    (tmp_path / "b.txt").write_text(docs[1])
    raw = fwp_data.load_raw_datasets(train_file=str(tmp_path / "a.txt"), validation_file=str(tmp_path / "b.txt"))
    assert list(raw["train"]["text"]) == [docs[0]] and list(raw["validation"]["text"]) == [docs[1]]  # a file is one document
    raw = fwp_data.load_raw_datasets(train_file=str(tmp_path / "a.txt"), validation_file=str(tmp_path / "b.txt"),
                                     text_sample_by="line")
    assert list(raw["train"]["text"])[:2] == ["document 0", "with two lines"]


def test_tokenizer_trained_cached_and_reused(tmp_path, corpus):
    texts = [text[:20000] for text in corpus["train"]["text"][:4]]
    messages = []
    tokenizer = tokenizer_utils.load_or_train_tokenizer(texts, vocab_size=400, cache_dir=tmp_path, log=messages.append)
    assert len(tokenizer) == 400
    assert tokenizer.bos_token == tokenizer.eos_token == tokenizer_utils.BOS_EOS_TOKEN
    assert tokenizer.pad_token == tokenizer_utils.PAD_TOKEN and tokenizer.pad_token_id != tokenizer.eos_token_id
    sample = "KING LEAR.\nNothing will come of nothing: speak again. — café ☃"  # byte-level: any text round-trips
    assert tokenizer.decode(tokenizer(sample)["input_ids"]) == sample
    again = tokenizer_utils.load_or_train_tokenizer(texts, vocab_size=400, cache_dir=tmp_path, log=messages.append)
    assert messages[0].startswith("Training") and messages[1].startswith("Reusing")
    assert again.get_vocab() == tokenizer.get_vocab()
    other = tokenizer_utils.load_or_train_tokenizer(texts[:2], vocab_size=400, cache_dir=tmp_path, log=messages.append)
    assert messages[2].startswith("Training")  # other text, other tokenizer
    with pytest.raises(ValueError, match="vocab_size"):
        tokenizer_utils.check_vocab_fits(other, 399)
    tokenizer_utils.check_vocab_fits(other, 400)


def test_word_level_tokenizer(tmp_path):
    texts = ["the king is dead , long live the king", "the queen is here"]
    tokenizer = tokenizer_utils.load_or_train_tokenizer(texts, vocab_size=8, cache_dir=tmp_path, kind="word")
    assert len(tokenizer) == 8  # 3 special tokens + the 5 most frequent words
    ids = tokenizer("the king is gone")["input_ids"]
    assert ids[-1] == tokenizer.unk_token_id and tokenizer.unk_token_id not in ids[:-1]
    assert tokenizer.decode(ids) == "the king is <unk>"
    with pytest.raises(ValueError, match="kind"):
        tokenizer_utils.load_or_train_tokenizer(texts, vocab_size=8, cache_dir=tmp_path, kind="chars")


def _toy_tokenized(lengths, seed=0):
    import datasets

    rng = np.random.default_rng(seed)
    docs = [rng.integers(2, 50, size=n).tolist() for n in lengths]
    return datasets.DatasetDict({"train": datasets.Dataset.from_dict({"input_ids": docs})}), docs


def test_blocks_and_pieces():
    tokenized, docs = _toy_tokenized([37, 5, 80, 1, 23])
    stream = [t for doc in docs for t in doc]
    blocks = fwp_data.group_into_blocks(tokenized, 16)["train"]
    assert all(len(b) == 16 for b in blocks["input_ids"]) and blocks["labels"] == blocks["input_ids"]
    assert [t for b in blocks["input_ids"] for t in b] == stream[: len(stream) // 16 * 16]

    pieces = list(fwp_data.split_into_pieces(tokenized, 16)["train"]["input_ids"])
    assert all(2 <= len(p) <= 16 for p in pieces)
    expected = [doc[i:i + 16] for doc in docs for i in range(0, len(doc), 16) if len(doc[i:i + 16]) >= 2]
    assert pieces == expected  # each piece is a slice of one document, in order


@pytest.mark.parametrize("world_size,batch", [(1, 3), (2, 3), (3, 2)])
def test_contiguous_streams_keep_each_row_on_its_stream(world_size, batch):
    """Simulates Accelerate's batch-by-batch sharding of a sequential sampler: process p gets global batches p,
    p + W, ...; row i of its batches, concatenated, must be one contiguous stretch of the token stream."""
    tokenized, docs = _toy_tokenized([300, 7, 450, 90])
    stream = [t for doc in docs for t in doc]
    segment = 10
    rows = fwp_data.contiguous_streams(tokenized["train"], segment, batch, world_size)
    num_streams = batch * world_size
    batches = [rows[n:n + batch] for n in range(0, len(rows), batch)]
    assert len(batches) % world_size == 0
    stream_length = (len(stream) - 1) // num_streams
    for p in range(world_size):
        mine = batches[p::world_size]
        assert [b["segment_index"] for b in mine] == [[j] * batch for j in range(len(mine))]
        for i in range(batch):
            inputs = [t for b in mine for t in b["input_ids"][i]]
            targets = [t for b in mine for t in b["shift_labels"][i]]
            start = (p * batch + i) * stream_length
            assert inputs == stream[start:start + len(inputs)]
            assert targets == stream[start + 1:start + 1 + len(inputs)]
            assert stream_length - segment < len(inputs) <= stream_length
    with pytest.raises(ValueError, match="too few"):
        fwp_data.contiguous_streams(tokenized["train"], 400, 4)


def test_contiguous_streams_fingerprint_without_pickling_the_table(monkeypatch):
    """datasets hashes an in-memory table with dill when it is given no fingerprint, which fails on Python 3.12
    (seen on the GPU machine: "Can't pickle <class 'MonthDayNano'>"); the streams carry a fingerprint of their
    tokens and layout instead: equal for equal tokens, different for other tokens or another layout."""
    import datasets.arrow_dataset

    def refuse(_):
        raise AssertionError("the streams' table was hashed by pickling")

    tokenized, _ = _toy_tokenized([300, 7, 450, 90])
    other, _ = _toy_tokenized([300, 7, 450, 91])
    monkeypatch.setattr(datasets.arrow_dataset, "generate_fingerprint", refuse)
    first = fwp_data.contiguous_streams(tokenized["train"], 10, 3)
    assert first._fingerprint == fwp_data.contiguous_streams(tokenized["train"], 10, 3)._fingerprint
    assert first._fingerprint != fwp_data.contiguous_streams(tokenized["train"], 10, 2)._fingerprint
    assert first._fingerprint != fwp_data.contiguous_streams(other["train"], 10, 3)._fingerprint
    assert first[1]["input_ids"][1:] == first[1]["shift_labels"][:-1]  # rows read back as token lists
    assert first.features["segment_index"].dtype == "int64"


def test_unigram_perplexity():
    assert fwp_data.unigram_perplexity([0, 1, 2, 3], [3, 2, 1, 0], 4) == pytest.approx(4.0)  # uniform: ppl = V
    train, valid = [0, 0, 0, 1], [0, 1]
    p0, p1 = 4 / 7, 2 / 7  # add-one counts (4, 2, 1) over 7
    expected = math.exp(-(math.log(p0) + math.log(p1)) / 2)
    assert fwp_data.unigram_perplexity(train, valid, 3) == pytest.approx(expected)


@pytest.fixture(scope="module")
def micro_model():
    torch.manual_seed(0)
    config = FWPConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_heads=2, head_dim=16,
                       intermediate_size=64, dropout=0.0, use_short_conv=True, position_embedding="rotary",
                       initializer_range=0.3)  # large weights: every token visibly depends on its context
    return FWPForCausalLM(config).double().eval()


@pytest.mark.parametrize("boundaries", ["cu_seq_lens_q", "position_ids"])
def test_packed_batch_loss_equals_per_document_losses(micro_model, boundaries):
    """The collator's flattened batch (boundaries as cu_seq_lens_q, or only as restarting position_ids) must give
    exactly the token-weighted mean of the documents' own losses: no state, convolution tail or position crosses a
    boundary, and no token is scored across one."""
    tokenized, docs = _toy_tokenized([23, 9, 41, 2, 17], seed=1)
    pieces = fwp_data.split_into_pieces(tokenized, 20)["train"]
    batch = fwp_data.packing_collator()([{"input_ids": p} for p in pieces["input_ids"]])
    assert batch["cu_seq_lens_q"].tolist() == np.cumsum([0] + [len(p) for p in pieces["input_ids"]]).tolist()
    if boundaries == "position_ids":
        batch = {k: batch[k] for k in ("input_ids", "labels", "position_ids")}
    with torch.no_grad():
        packed = micro_model(**batch).loss
        weighted = sum(micro_model(torch.tensor([p]), labels=torch.tensor([p])).loss * (len(p) - 1)
                       for p in pieces["input_ids"])
        merged = micro_model(batch["input_ids"], labels=batch["labels"]).loss  # one sequence, boundaries ignored
    expected = weighted / sum(len(p) - 1 for p in pieces["input_ids"])
    torch.testing.assert_close(packed, expected, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(merged, expected, rtol=1e-6, atol=1e-6)  # the boundaries matter
