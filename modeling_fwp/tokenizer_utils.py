"""Tokenizers for the training script, trained with `tokenizers` on the training split, saved as a
PreTrainedTokenizerFast, and reused (from a cache keyed by the training text, kind and vocabulary size) when they
exist: a byte-level BPE (the default) or a word-level vocabulary (the paper's WikiText-103 setting, where
perplexity is per word)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

BOS_EOS_TOKEN = "<|endoftext|>"  # one token marks both document start and end, as in GPT-2
PAD_TOKEN = "<|pad|>"
UNK_TOKEN = "<unk>"  # word-level only: a byte-level BPE encodes everything
TOKENIZER_KINDS = ("bpe", "word")
TOKENIZER_FORMAT_VERSION = "v1"  # part of the cache key: bump when a recipe below changes


def default_cache_dir() -> Path:
    root = os.environ.get("MODELING_FWP_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache")), "modeling_fwp")
    return Path(root) / "tokenizers"


def train_byte_level_bpe(texts: Iterable[str], vocab_size: int = 8192, min_frequency: int = 2):
    """A byte-level BPE of exactly `vocab_size` entries (special tokens included) as a PreTrainedTokenizerFast.

    Byte-level: every string is encodable (256 byte symbols seed the alphabet), so there is no unknown token.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = [BOS_EOS_TOKEN, PAD_TOKEN]
    minimum = len(pre_tokenizers.ByteLevel.alphabet()) + len(special)
    if not isinstance(vocab_size, int) or vocab_size < minimum:
        raise ValueError(f"vocab_size={vocab_size!r} is too small for a byte-level BPE; it must be >= {minimum}.")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=BOS_EOS_TOKEN, eos_token=BOS_EOS_TOKEN,
                                   pad_token=PAD_TOKEN, clean_up_tokenization_spaces=False)


def train_word_level(texts: Iterable[str], vocab_size: int):
    """A whitespace word-level vocabulary of at most `vocab_size` entries (the most frequent words, then <unk>), as
    used for WikiText-103 in the paper; decoding joins words with spaces."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = [BOS_EOS_TOKEN, PAD_TOKEN, UNK_TOKEN]
    if not isinstance(vocab_size, int) or vocab_size <= len(special):
        raise ValueError(f"vocab_size={vocab_size!r} is too small for a word-level vocabulary; it must be > 3.")
    tokenizer = Tokenizer(models.WordLevel(unk_token=UNK_TOKEN))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, min_frequency=1, special_tokens=special,
                                        show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=BOS_EOS_TOKEN, eos_token=BOS_EOS_TOKEN,
                                   pad_token=PAD_TOKEN, unk_token=UNK_TOKEN, clean_up_tokenization_spaces=False)


def load_or_train_tokenizer(train_texts: list[str], vocab_size: int = 8192, cache_dir: str | os.PathLike | None = None,
                            log=print, kind: str = "bpe"):
    """The tokenizer of `kind` ("bpe": byte-level BPE, "word": word-level) for `train_texts`: loaded from the cache
    when it was trained before on the same texts with the same vocabulary size, otherwise trained and cached.
    Trained on the training split only, so validation and test text never shape the vocabulary."""
    from transformers import PreTrainedTokenizerFast

    if kind not in TOKENIZER_KINDS:
        raise ValueError(f"tokenizer kind {kind!r} is not valid; allowed: {', '.join(TOKENIZER_KINDS)}.")
    digest = hashlib.sha256(f"{kind}-{TOKENIZER_FORMAT_VERSION}".encode())
    for text in train_texts:
        digest.update(text.encode("utf-8"))
        digest.update(b"\x00")
    folder = Path(cache_dir or default_cache_dir()) / f"{kind}-{digest.hexdigest()[:16]}-v{vocab_size}"
    name = {"bpe": "byte-level BPE", "word": "word-level"}[kind]
    corrupt = False
    if (folder / "tokenizer.json").is_file():
        try:
            tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
        except Exception as error:  # cut short, edited, or written by an incompatible `tokenizers`
            reason = " ".join(str(error).split())[:200] or type(error).__name__
            log(f"The cached tokenizer {folder / 'tokenizer.json'} cannot be read ({reason}); rebuilding it "
                "(the cache is keyed by the training text, so the rebuilt tokenizer has the same ids)")
            corrupt = True
        else:
            log(f"Reusing the {name} tokenizer in {folder}")
            return tokenizer
    log(f"Training a {name} tokenizer (vocabulary {vocab_size}) on {len(train_texts)} training documents")
    train = train_byte_level_bpe if kind == "bpe" else train_word_level
    tokenizer = train(train_texts, vocab_size=vocab_size)
    # Write to a temporary folder, then rename, so concurrent processes never read a half-written tokenizer.
    import shutil

    from .files import give_umask_modes, install_folder, temporary_sibling

    folder.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_sibling(folder, "writing")
    try:
        tokenizer.save_pretrained(temporary)
        give_umask_modes(temporary)  # as install_folder does: os.replace below keeps mkdtemp's private mode
        if corrupt:
            install_folder(temporary, folder)  # replaces the unreadable copy
        else:
            os.replace(temporary, folder)
    except OSError:  # another process got there first: keep its copy
        shutil.rmtree(temporary, ignore_errors=True)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return tokenizer


def load_tokenizer(name_or_path: str):
    """Any tokenizer by Hub name or local path; gets a pad token (its EOS) when it has none, for batched
    generation."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_vocab_fits(tokenizer, vocab_size: int) -> None:
    """Refuses a tokenizer that can emit ids the model's embedding has no row for."""
    size = len(tokenizer)
    if size > vocab_size:
        raise ValueError(
            f"The tokenizer has {size} tokens but the model's vocab_size is {vocab_size}: ids >= {vocab_size} would "
            f"index past the embedding. Use a model with vocab_size >= {size} (e.g. --config_overrides "
            f"vocab_size={size}) or a smaller tokenizer.")
