"""Multi30k (Task 1, English-German, raw text) and a subword tokenizer trained on it locally.

Files: ``<data root>/multi30k/{split}.{lang}.gz``, one caption per line, line-aligned across languages (see
``shared/data/multi30k/MANIFEST.md``; research / non-commercial terms: tests and benchmarks only).

The tokenizer is trained here with the ``tokenizers`` library (no download): a shared BPE vocabulary over both
sides of the training split, SentencePiece-style (NFKC, ``▁`` marks a preceding space, so ``decode`` gives back
the detokenised sentence), specials ``<pad>`` ``<unk>`` ``<s>`` ``</s>`` at ids 0-3 and ``</s>`` appended to every
sequence. It is returned as a ``PreTrainedTokenizerFast``: ``save_pretrained`` next to the model, reload with
``AutoTokenizer.from_pretrained``.
"""

from __future__ import annotations

import gzip
from collections.abc import Iterable
from pathlib import Path

from . import dataset_dir

NAME = "multi30k"
SPLITS = {"train": 29000, "val": 1014, "test_2016_flickr": 1000, "test_2017_flickr": 1000,
          "test_2017_mscoco": 461, "test_2018_flickr": 1071}
LANGUAGES = ("en", "de")
DEFAULT_SPLITS = ("train", "val", "test_2016_flickr")
PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS)  # ids 0, 1, 2, 3


def _file(split: str, lang: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"unknown Multi30k split {split!r}; choose one of {', '.join(SPLITS)}")
    if lang not in LANGUAGES:
        raise ValueError(f"unknown Multi30k language {lang!r}; this copy has {', '.join(LANGUAGES)}")
    return f"{split}.{lang}.gz"


def multi30k_dir(splits: Iterable[str] = DEFAULT_SPLITS, languages: Iterable[str] = LANGUAGES) -> Path:
    """The Multi30k folder, checked to hold ``{split}.{lang}.gz`` for the given splits and languages."""
    return dataset_dir(NAME, tuple(_file(s, lang) for s in splits for lang in languages))


def read_lines(split: str, lang: str) -> list[str]:
    """One sentence per line of ``{split}.{lang}.gz`` (line breaks removed, nothing else touched)."""
    path = multi30k_dir((split,), (lang,)) / _file(split, lang)
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return f.read().splitlines()


def load_pairs(split: str, source_lang: str = "en", target_lang: str = "de",
               max_samples: int | None = None) -> tuple[list[str], list[str]]:
    """(sources, targets) of one split, line-aligned; the first ``max_samples`` pairs if given."""
    if source_lang == target_lang:
        raise ValueError(f"source and target language are both {source_lang!r}")
    multi30k_dir((split,), (source_lang, target_lang))  # both sides present, or one error naming what is missing
    sources, targets = read_lines(split, source_lang), read_lines(split, target_lang)
    if len(sources) != len(targets):
        raise ValueError(f"Multi30k {split}: {len(sources)} {source_lang} lines but {len(targets)} "
                         f"{target_lang} lines; the files are not aligned")
    if max_samples is not None:
        sources, targets = sources[:max_samples], targets[:max_samples]
    return sources, targets


def load_multi30k(splits: Iterable[str] = DEFAULT_SPLITS, source_lang: str = "en", target_lang: str = "de"):
    """``datasets.DatasetDict`` of the splits, columns ``source`` and ``target`` (raw, untokenised text)."""
    import datasets

    splits = tuple(splits)
    multi30k_dir(splits, (source_lang, target_lang))  # fail before reading anything
    out = {}
    for split in splits:
        sources, targets = load_pairs(split, source_lang, target_lang)
        out[split] = datasets.Dataset.from_dict({"source": sources, "target": targets})
    return datasets.DatasetDict(out)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 8000, model_max_length: int = 256):
    """A BPE ``PreTrainedTokenizerFast`` trained on ``texts``: ``<pad>`` ``<unk>`` ``<s>`` ``</s>`` = ids 0-3,
    ``</s>`` appended to every encoded sequence, lossless ``decode`` up to NFKC normalisation."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    eos_id = tok.token_to_id(EOS)
    tok.post_processor = processors.TemplateProcessing(single=f"$A {EOS}", pair=f"$A $B {EOS}",
                                                       special_tokens=[(EOS, eos_id)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, unk_token=UNK, bos_token=BOS,
                                   eos_token=EOS, model_max_length=model_max_length)


def multi30k_tokenizer(vocab_size: int = 8000, languages: Iterable[str] = LANGUAGES, model_max_length: int = 256):
    """The shared tokenizer of ``train_tokenizer`` trained on the training split of every language given."""
    texts = []
    for lang in languages:
        texts.extend(read_lines("train", lang))
    return train_tokenizer(texts, vocab_size=vocab_size, model_max_length=model_max_length)
