"""Offline text corpora for language modelling, as fixed-length examples for ``Trainer``.

* ``load_ptb``: Penn Treebank, Mikolov's word-level version (``ptb.{train,valid,test}.txt.gz``): one ``<eos>``
  appended per line, vocabulary from train (10,000 words, ``<unk>`` included). Licence unclear: tests and
  benchmarks only (see ``shared/data/ptb/MANIFEST.md``).
* ``load_tinyshakespeare``: char-rnn Tiny Shakespeare (public domain), char or word level, first 90 % train,
  last 10 % validation (the usual split; there is no official one).
* ``load_text_files`` / ``load_text_dataset``: any local text files, or a ``datasets`` dataset with a text column
  (e.g. ``load_dataset("text", data_files=...)`` or ``load_from_disk``).
* ``load_lm_corpus``: the dispatcher the recipe uses (``ptb``, ``tinyshakespeare[-char|-word]`` or a path).

Examples (``LMChunks``): the token stream of a split cut into contiguous chunks of ``seq_len + 1`` tokens that
overlap by one, chunk ``i = tokens[i*seq_len : i*seq_len + seq_len + 1]``, with ``labels == input_ids`` (the
model shifts them, HF causal-LM convention). Every token after the first is predicted exactly once (the last
``< seq_len`` tokens of the stream are dropped) and every example has ``seq_len`` predicted tokens, so the mean
of the Trainer's example-weighted eval loss is the token mean and ``perplexity = exp(eval_loss)`` exactly.
The hidden state is not carried between chunks (map-style dataset, shuffled): each chunk starts from zero.
"""

from __future__ import annotations

import gzip
import json
import os
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from . import DATA_ENV, dataset_dir

EOS = "<eos>"
UNK = "<unk>"
PTB_FILES = ("ptb.train.txt.gz", "ptb.valid.txt.gz", "ptb.test.txt.gz")
SHAKESPEARE_FILE = "input.txt.gz"
LEVELS = ("word", "char")
SPLIT_ALIASES = {"train": "train", "validation": "validation", "valid": "validation", "dev": "validation",
                 "test": "test"}
_WORD_RE = re.compile(r"[A-Za-z0-9]+(?:'[A-Za-z]+)*|[^\sA-Za-z0-9]")


# ---------------------------------------------------------------------------------------------------- vocabulary
class Vocabulary:
    """Token <-> id. ``unk`` (if set) receives tokens not in the vocabulary; without it they are an error."""

    def __init__(self, itos: Sequence[str], unk: str | None = UNK, level: str = "word"):
        self.itos = list(itos)
        self.stoi = {tok: i for i, tok in enumerate(self.itos)}
        if len(self.stoi) != len(self.itos):
            raise ValueError("vocabulary has duplicate tokens")
        self.unk = unk if unk in self.stoi else None
        self.level = level

    def __len__(self) -> int:
        return len(self.itos)

    def __contains__(self, token: str) -> bool:
        return token in self.stoi

    @classmethod
    def build(cls, tokens: Iterable[str], max_size: int | None = None, unk: str | None = UNK,
              level: str = "word") -> Vocabulary:
        """Most frequent first (ties alphabetical: deterministic). ``unk`` is added (first) when it is not a token
        of the corpus, and counts towards ``max_size``."""
        counts = Counter(tokens)
        ordered = sorted(counts, key=lambda t: (-counts[t], t))
        extra = [unk] if unk is not None and unk not in counts else []
        if max_size is not None:
            if max_size <= len(extra):
                raise ValueError(f"max_size={max_size} is too small")
            ordered = ordered[: max_size - len(extra)]
            if unk is not None and unk in counts and unk not in ordered:
                ordered[-1] = unk
        return cls(extra + ordered, unk=unk, level=level)

    def encode(self, tokens: Iterable[str]) -> torch.Tensor:
        stoi, unk_id = self.stoi, self.stoi.get(self.unk) if self.unk is not None else None
        try:
            ids = [stoi[t] if unk_id is None else stoi.get(t, unk_id) for t in tokens]
        except KeyError as err:
            raise KeyError(f"token {err.args[0]!r} is not in the vocabulary and it has no unknown token") from None
        return torch.tensor(ids, dtype=torch.long)

    def decode(self, ids: Iterable[int]) -> list[str]:
        return [self.itos[int(i)] for i in ids]

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps({"itos": self.itos, "unk": self.unk, "level": self.level}))

    @classmethod
    def load(cls, path: str | os.PathLike) -> Vocabulary:
        d = json.loads(Path(path).read_text())
        return cls(d["itos"], unk=d.get("unk"), level=d.get("level", "word"))


# ---------------------------------------------------------------------------------------------------- examples
class LMChunks(torch.utils.data.Dataset):
    """Fixed-length LM examples over one token stream: chunk ``i`` is ``ids[i*L : i*L + L + 1]`` (``L =
    seq_len``), ``{"input_ids": chunk, "labels": chunk}``. Views into the stream, no copy."""

    def __init__(self, ids: torch.Tensor, seq_len: int, num_chunks: int | None = None):
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.ids = ids.long().reshape(-1)
        self.seq_len = seq_len
        available = max((self.ids.numel() - 1) // seq_len, 0)
        self.num_chunks = available if num_chunks is None else min(num_chunks, available)

    def __len__(self) -> int:
        return self.num_chunks

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if i < 0:
            i += self.num_chunks
        if not 0 <= i < self.num_chunks:
            raise IndexError(i)
        chunk = self.ids[i * self.seq_len: i * self.seq_len + self.seq_len + 1]
        return {"input_ids": chunk, "labels": chunk}

    def select(self, n: int | None) -> LMChunks:
        """The first ``n`` chunks (all when ``n`` is None), like ``datasets.Dataset.select(range(n))``."""
        return self if n is None else LMChunks(self.ids, self.seq_len, n)

    @property
    def num_predicted_tokens(self) -> int:
        return self.num_chunks * self.seq_len


def lm_chunks(ids: torch.Tensor, seq_len: int) -> LMChunks:
    return LMChunks(ids, seq_len)


class LMStreams(torch.utils.data.Dataset):
    """Stateful LM examples (truncated BPTT, as Zaremba et al. and the TF PTB reader): the token stream is cut into
    ``num_streams`` contiguous streams of ``L = (N - 1) // num_streams`` tokens (+1 for the last target); example
    ``i = t * num_streams + s`` is position ``t`` of stream ``s``, ``ids[s*L + t*seq_len : s*L + t*seq_len +
    seq_len + 1]``, with ``stream_ids = s`` and ``stream_positions = t`` for the model's ``CarriedState``.

    Read in index order (``train_sampling_strategy="sequential"``), each global batch of ``num_streams`` examples
    is one position of every stream, and a rank's k-th micro-batch holds the same streams at every step (HF and
    Accelerate hand rank r of W the per-device batches r, r + W, ...), so 1 rank x 2 micro-batches and 2 ranks x 1
    see the same streams. ``num_streams`` is the global batch: a larger batch means more, shorter streams (as in
    LEGW's and Goyal-style LSTM scaling, where the batch is the number of parallel streams and the BPTT length is
    fixed). ``max_positions`` keeps the first positions only (quick runs)."""

    ordered = True  # the trainer refuses any order but the index order

    def __init__(self, ids: torch.Tensor, num_streams: int, seq_len: int, max_positions: int | None = None):
        if num_streams < 1 or seq_len < 1:
            raise ValueError(f"num_streams and seq_len must be >= 1, got {num_streams} and {seq_len}")
        self.ids = ids.long().reshape(-1)
        self.num_streams, self.seq_len = num_streams, seq_len
        self.stream_length = (self.ids.numel() - 1) // num_streams
        positions = self.stream_length // seq_len
        self.num_positions = positions if max_positions is None else min(max_positions, positions)
        if self.num_positions < 1:
            raise ValueError(f"{self.ids.numel()} tokens are too few for {num_streams} streams of at least "
                             f"{seq_len + 1} tokens: fewer streams (a smaller batch) or a shorter seq_len")

    def __len__(self) -> int:
        return self.num_positions * self.num_streams

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        position, stream = divmod(i, self.num_streams)
        start = stream * self.stream_length + position * self.seq_len
        chunk = self.ids[start: start + self.seq_len + 1]
        return {"input_ids": chunk, "labels": chunk, "stream_ids": torch.tensor(stream),
                "stream_positions": torch.tensor(position)}

    @property
    def num_predicted_tokens(self) -> int:
        return len(self) * self.seq_len


@dataclass
class LMCorpus:
    """The token streams of a corpus' splits and their vocabulary."""

    name: str
    vocab: Vocabulary
    splits: dict[str, torch.Tensor]  # "train" / "validation" / "test" -> 1-D token ids

    def chunks(self, split: str, seq_len: int, max_samples: int | None = None) -> LMChunks:
        return LMChunks(self._split(split), seq_len).select(max_samples)

    def streams(self, split: str, num_streams: int, seq_len: int, max_positions: int | None = None) -> LMStreams:
        return LMStreams(self._split(split), num_streams, seq_len, max_positions)

    def _split(self, split: str) -> torch.Tensor:
        if split not in self.splits:
            raise KeyError(f"{self.name} has no {split!r} split (it has {', '.join(self.splits)})")
        return self.splits[split]

    def num_tokens(self, split: str) -> int:
        return int(self.splits[split].numel())


# ---------------------------------------------------------------------------------------------------- tokenising
def _open_text(path: str | os.PathLike):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"text file {path} does not exist")
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def read_text(path: str | os.PathLike) -> str:
    with _open_text(path) as f:
        return f.read()


def tokenize_lines(lines: Iterable[str], level: str = "word", lowercase: bool = False,
                   split_punctuation: bool = False) -> list[str]:
    """Word level (Mikolov): the whitespace-split words of each non-empty line followed by ``<eos>``
    (``split_punctuation`` also separates punctuation from words). Char level: every character, newlines
    included (lines must keep their ``\\n``)."""
    if level == "char":
        text = "".join(lines)
        return list(text.lower() if lowercase else text)
    if level != "word":
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    tokens: list[str] = []
    for line in lines:
        if lowercase:
            line = line.lower()
        words = _WORD_RE.findall(line) if split_punctuation else line.split()
        if words:
            tokens.extend(words)
            tokens.append(EOS)
    return tokens


def encode_splits(name: str, split_tokens: dict[str, list[str]], vocab: Vocabulary | None = None,
                  max_vocab_size: int | None = None, level: str = "word") -> LMCorpus:
    """Build the vocabulary from ``split_tokens["train"]`` (unless given) and encode every split."""
    if vocab is None:
        vocab = Vocabulary.build(split_tokens["train"], max_size=max_vocab_size,
                                 unk=UNK if level == "word" else None, level=level)
    return LMCorpus(name, vocab, {split: vocab.encode(toks) for split, toks in split_tokens.items()})


# ---------------------------------------------------------------------------------------------------- corpora
def load_ptb(vocab: Vocabulary | None = None) -> LMCorpus:
    """Penn Treebank (Mikolov): 929,589 / 73,760 / 82,430 tokens with ``<eos>``, 10,000 words."""
    folder = dataset_dir("ptb", PTB_FILES)
    split_tokens = {}
    for split, file in zip(("train", "validation", "test"), PTB_FILES):
        with _open_text(folder / file) as f:
            split_tokens[split] = tokenize_lines(f, level="word")
    return encode_splits("ptb", split_tokens, vocab=vocab)


def split_text(text: str, valid_fraction: float = 0.1, at_line: bool = False) -> tuple[str, str]:
    """First ``1 - valid_fraction`` of the characters for training, the rest for validation (nanoGPT's split);
    ``at_line`` moves the cut to the next line start so that no line is cut in two."""
    if not 0.0 < valid_fraction < 1.0:
        raise ValueError(f"valid_fraction must be in (0, 1), got {valid_fraction}")
    cut = int(len(text) * (1.0 - valid_fraction))
    if at_line:
        nl = text.find("\n", cut)
        cut = len(text) if nl < 0 else nl + 1
    return text[:cut], text[cut:]


def load_tinyshakespeare(level: str = "char", vocab: Vocabulary | None = None, valid_fraction: float = 0.1,
                         max_vocab_size: int | None = 10000, lowercase: bool | None = None) -> LMCorpus:
    """Tiny Shakespeare: char level (65 characters, newlines included) or word level (lower-cased, punctuation
    split off, ``<eos>`` per non-empty line, the ``max_vocab_size`` most frequent words plus ``<unk>``)."""
    folder = dataset_dir("tinyshakespeare", (SHAKESPEARE_FILE,))
    return load_text_corpus(read_text(folder / SHAKESPEARE_FILE), name=f"tinyshakespeare-{level}", level=level,
                            vocab=vocab, valid_fraction=valid_fraction, max_vocab_size=max_vocab_size,
                            lowercase=(level == "word") if lowercase is None else lowercase,
                            split_punctuation=True)


def load_text_corpus(text: str, name: str = "text", level: str = "word", vocab: Vocabulary | None = None,
                     valid_fraction: float = 0.1, max_vocab_size: int | None = 10000, lowercase: bool = False,
                     split_punctuation: bool = False) -> LMCorpus:
    """One text, split into train / validation by ``split_text``."""
    train, valid = split_text(text, valid_fraction, at_line=(level == "word"))
    split_tokens = {
        split: tokenize_lines(part.splitlines(keepends=True), level, lowercase, split_punctuation)
        for split, part in (("train", train), ("validation", valid))
    }
    return encode_splits(name, split_tokens, vocab=vocab, max_vocab_size=max_vocab_size, level=level)


def load_text_files(train: str | os.PathLike, validation: str | os.PathLike | None = None,
                    test: str | os.PathLike | None = None, level: str = "word", vocab: Vocabulary | None = None,
                    valid_fraction: float = 0.1, max_vocab_size: int | None = 10000, lowercase: bool = False,
                    split_punctuation: bool = False, name: str | None = None) -> LMCorpus:
    """Local text files (``.gz`` read transparently), one sentence/line per line for word level. Without a
    validation file the train file is split (``valid_fraction``)."""
    name = name or Path(train).name
    if validation is None:
        if test is not None:
            raise ValueError("a test file needs a validation file too")
        return load_text_corpus(read_text(train), name, level, vocab, valid_fraction, max_vocab_size, lowercase,
                                split_punctuation)
    split_tokens = {}
    for split, path in (("train", train), ("validation", validation), ("test", test)):
        if path is not None:
            with _open_text(path) as f:
                split_tokens[split] = tokenize_lines(f, level, lowercase, split_punctuation)
    return encode_splits(name, split_tokens, vocab=vocab, max_vocab_size=max_vocab_size, level=level)


def load_text_dataset(dataset, text_column: str = "text", level: str = "word", vocab: Vocabulary | None = None,
                      valid_fraction: float = 0.1, max_vocab_size: int | None = 10000, lowercase: bool = False,
                      split_punctuation: bool = False, name: str = "dataset") -> LMCorpus:
    """A ``datasets.DatasetDict`` (or dict of ``Dataset``) whose rows are lines of text, e.g.
    ``load_dataset("text", data_files={"train": ..., "validation": ...})``. Split names ``train``,
    ``validation``/``valid``/``dev`` and ``test``; without a validation split the train split is cut
    (``valid_fraction``)."""
    found = {SPLIT_ALIASES[s]: dataset[s] for s in dataset if s in SPLIT_ALIASES}
    if "train" not in found:
        raise ValueError(f"dataset {name!r} has no 'train' split (it has {', '.join(dataset)})")

    def lines(ds) -> list[str]:
        if text_column not in ds.column_names:
            raise ValueError(f"dataset {name!r} has no column {text_column!r} (it has {ds.column_names})")
        return [t if t.endswith("\n") else t + "\n" for t in ds[text_column]]

    if "validation" not in found:
        return load_text_corpus("".join(lines(found["train"])), name, level, vocab, valid_fraction,
                                max_vocab_size, lowercase, split_punctuation)
    split_tokens = {split: tokenize_lines(lines(ds), level, lowercase, split_punctuation)
                    for split, ds in found.items()}
    return encode_splits(name, split_tokens, vocab=vocab, max_vocab_size=max_vocab_size, level=level)


def _split_files(folder: Path) -> dict[str, Path]:
    """``train`` / ``valid|validation|dev`` / ``test`` text files in a folder (``*.txt``, ``*.txt.gz``, also as
    ``<prefix>.train.txt``)."""
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        name = path.name.removesuffix(".gz")
        if not (path.is_file() and name.endswith(".txt")):
            continue
        split = SPLIT_ALIASES.get(name.removesuffix(".txt").rsplit(".", 1)[-1])
        if split and split not in found:
            found[split] = path
    return found


def load_lm_corpus(dataset: str, level: str | None = None, vocab: Vocabulary | None = None,
                   max_vocab_size: int | None = 10000, valid_fraction: float = 0.1,
                   lowercase: bool = False, text_column: str = "text") -> LMCorpus:
    """What the recipe's ``--dataset`` accepts:

    * ``ptb``; ``tinyshakespeare`` (char level unless ``level="word"``), ``tinyshakespeare-char`` /
      ``tinyshakespeare-word``;
    * a text file (``.txt`` / ``.gz``): split into train / validation;
    * a folder with ``train.txt`` (+ ``valid.txt``/``validation.txt``/``dev.txt``, ``test.txt``; ``.gz`` too, or
      ``<prefix>.train.txt`` as PTB names them);
    * a folder written by ``datasets``' ``save_to_disk`` (a ``DatasetDict`` with a ``text`` column).
    """
    key = dataset.lower()
    if key == "ptb":
        if level not in (None, "word"):
            raise ValueError("PTB is word level")
        return load_ptb(vocab=vocab)
    if key.startswith("tinyshakespeare"):
        suffix = key.removeprefix("tinyshakespeare").lstrip("-_")
        if suffix and level not in (None, suffix):
            raise ValueError(f"--dataset {dataset} contradicts level={level!r}")
        return load_tinyshakespeare(level=suffix or level or "char", vocab=vocab, valid_fraction=valid_fraction,
                                    max_vocab_size=max_vocab_size)
    path = Path(dataset).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"dataset {dataset!r} is neither 'ptb' nor 'tinyshakespeare' nor an existing path ({path.resolve()} "
            f"does not exist). Built-in corpora are read from {DATA_ENV} (see hf_largebatch.data)."
        )
    level = level or "word"
    if path.is_file():
        return load_text_files(path, level=level, vocab=vocab, valid_fraction=valid_fraction,
                               max_vocab_size=max_vocab_size, lowercase=lowercase)
    if (path / "dataset_dict.json").is_file():
        from datasets import load_from_disk

        return load_text_dataset(load_from_disk(str(path)), text_column=text_column, level=level, vocab=vocab,
                                 valid_fraction=valid_fraction, max_vocab_size=max_vocab_size,
                                 lowercase=lowercase, name=path.name)
    files = _split_files(path)
    if "train" not in files:
        raise FileNotFoundError(f"{path} has no train.txt (or train.txt.gz, <name>.train.txt) and is not a "
                                "datasets save_to_disk folder")
    return load_text_files(files["train"], files.get("validation"), files.get("test"), level=level, vocab=vocab,
                           valid_fraction=valid_fraction, max_vocab_size=max_vocab_size, lowercase=lowercase,
                           name=path.name)
