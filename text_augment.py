"""Caption augmentation of CLIP🚀 (Fini et al., 2023): weak and strong text views.

- weak text: stop-word removal with probability `remove_stopwords_prob`;
- strong text: the same stop-word removal, then (with `text_augment`) ONE EDA operation (Wei & Zou, 2019,
  "EDA: Easy Data Augmentation Techniques...") drawn with weights (no_text_augment_prob,
  synonym_replacement_prob, random_swap_prob, random_deletion_prob) from (identity, synonym replacement
  of n=1 word, random swap of n=1 pair, random deletion with p=0.1), as clip-rocket's tokenizer with
  textaugment's EDA defaults. Random insertion is not used.
- `clean_before_augment`: CLIP's caption cleaning first (ftfy, HTML unescape twice, whitespace) and
  lower-casing.
English synonyms come from WordNet 3.0 through nltk, with the data prepared offline from Debian's packages
by `scripts/prepare_nltk_data.sh` (default folder: <repo>/.nltk_data). Chinese captions use jieba words
(characters when a caption is a single word), the Chinese stop-word list and swap / deletion only (no
WordNet); the augmenter is picked by the text tower's language (`build_text_augmenter`).

Randomness comes from Python's `random` module; `datasets.seeded()` seeds it per sample from
(seed, epoch, index), so a resumed run sees the same captions. No operation returns an empty caption:
an op that empties the text falls back to its input.

Fork safety (DataLoader workers): WordNet's lemma index and jieba's dictionary are loaded once into memory and
shared with forked workers, and nothing is read through a file handle opened before the fork: nltk reads WordNet
synsets by seek + readline through handles it keeps open, so `wordnet_reader` gives each process its own
(`readers.PerProcessFile`); jieba keeps no file open once initialised.
"""
from __future__ import annotations

import functools
import html
import logging
import os
import random
import re

import readers

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_NLTK_DATA = os.path.join(HERE, ".nltk_data")
STOPWORDS_EN = os.path.join(HERE, "assets", "stopwords_en.txt")
STOPWORDS_ZH = os.path.join(HERE, "assets", "stopwords_zh.txt")
WORDNET_FIX = ("WordNet data is missing (needed by --synonym-replacement-prob > 0 with --text-augment). Fix: "
               "`sudo bash scripts/ci_wordnet.sh` (installs Debian's wordnet-base + wordnet-sense-index and builds "
               f"{DEFAULT_NLTK_DATA}), or with the packages installed `NLTK_DATA=/some/dir bash "
               "scripts/prepare_nltk_data.sh` and export NLTK_DATA=/some/dir; or pass --synonym-replacement-prob 0.")


def load_word_list(path: str) -> frozenset[str]:
    """One word per line; lines starting with '#' are comments (provenance headers)."""
    with open(path, encoding="utf-8") as f:
        return frozenset(line.strip() for line in f if line.strip() and not line.startswith("#"))


def clean_caption(text: str) -> str:
    """CLIP's caption cleaning: ftfy, HTML unescape (twice), whitespace collapse, then lower-case."""
    import ftfy

    text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return re.sub(r"\s+", " ", text).strip().lower()


# --------------------------------------------------------------------------- WordNet
def _use_default_nltk_data() -> None:
    import nltk

    if DEFAULT_NLTK_DATA not in nltk.data.path:
        nltk.data.path.append(DEFAULT_NLTK_DATA)


def wordnet_available() -> bool:
    """True when $NLTK_DATA (or <repo>/.nltk_data) holds the WordNet files nltk's reader needs (a file check:
    loading WordNet itself takes ~10 s and happens at the first synonym lookup)."""
    _use_default_nltk_data()
    import nltk

    try:
        for name in ("lexnames", "index.sense", "data.noun", "index.noun"):
            nltk.data.find(f"corpora/wordnet/{name}")
        return True
    except LookupError:
        return False


@functools.lru_cache(maxsize=1)
def wordnet_reader():
    """nltk's WordNet reader, built once (~10 s: the lemma index is parsed into memory, which forked DataLoader
    workers then share) with every file it opens wrapped in `readers.PerProcessFile`. nltk keeps the data files
    (`data.noun`, ...) open and reads a synset by seek + readline; a handle inherited through fork shares its file
    offset with the parent's and the other workers', so concurrent lookups misread ("No WordNet synset found for
    pos=a at offset=...", or a wrong synset). Each process reads through its own handle instead."""
    _use_default_nltk_data()
    import nltk
    from nltk.corpus.reader import CorpusReader, WordNetCorpusReader
    from nltk.corpus.util import LazyCorpusLoader

    class ForkSafeWordNet(WordNetCorpusReader):
        def open(self, file):  # CorpusReader.open: every file the reader reads goes through here
            return readers.PerProcessFile(lambda: WordNetCorpusReader.open(self, file))

    try:
        root = nltk.data.find("corpora/wordnet")
    except LookupError:
        root = nltk.data.find("corpora/wordnet.zip/wordnet/")
    # the multilingual data, as nltk.corpus.wordnet passes it (loaded only if asked, which we never do)
    return ForkSafeWordNet(root, LazyCorpusLoader("omw-1.4", CorpusReader, r".*/wn-data-.*\.tab", encoding="utf8"))


@functools.lru_cache(maxsize=65536)
def wordnet_synonyms(word: str) -> tuple[str, ...]:
    """Sorted distinct WordNet lemma names of every synset of `word` ('_' -> ' '), without the word itself."""
    names = {lemma.name().replace("_", " ").replace("-", " ").lower()
             for synset in wordnet_reader().synsets(word) for lemma in synset.lemmas()}
    names.discard(word.lower())
    return tuple(sorted(n for n in names if n.strip()))


# --------------------------------------------------------------------------- EDA operations (on word lists)
def synonym_replacement(words: list[str], n: int = 1, stopwords: frozenset[str] = frozenset()) -> list[str]:
    """Replace every occurrence of up to n distinct non-stop words that have WordNet synonyms by one synonym."""
    candidates = sorted({w for w in words if w.lower() not in stopwords})
    random.shuffle(candidates)
    out, replaced = list(words), 0
    for word in candidates:
        synonyms = wordnet_synonyms(word)
        if synonyms:
            choice = random.choice(synonyms)
            out = [choice if w == word else w for w in out]
            replaced += 1
        if replaced >= n:
            break
    return out


def random_swap(words: list[str], n: int = 1) -> list[str]:
    """Swap the words at two distinct random positions, n times (unchanged when fewer than 2 words)."""
    out = list(words)
    if len(out) < 2:
        return out
    for _ in range(n):
        i, j = random.sample(range(len(out)), 2)
        out[i], out[j] = out[j], out[i]
    return out


def random_deletion(words: list[str], p: float = 0.1) -> list[str]:
    """Drop each word with probability p; keep one random word if all were dropped."""
    if len(words) <= 1:
        return list(words)
    kept = [w for w in words if random.uniform(0, 1) > p]
    return kept or [random.choice(words)]


# --------------------------------------------------------------------------- augmenters
class TextAugmenter:
    """Weak/strong caption views for one language; subclasses define tokenize/join/synonyms."""

    language = ""

    def __init__(self, stopwords: frozenset[str], remove_stopwords_prob: float = 0.8, text_augment: bool = False,
                 synonym_replacement_prob: float = 0.4, random_swap_prob: float = 0.4,
                 random_deletion_prob: float = 0.2, no_text_augment_prob: float = 0.0,
                 clean_before_augment: bool = False) -> None:
        self.stopwords = stopwords
        self.remove_stopwords_prob, self.text_augment = remove_stopwords_prob, text_augment
        self.weights = (no_text_augment_prob, synonym_replacement_prob, random_swap_prob, random_deletion_prob)
        self.clean_before_augment = clean_before_augment

    def tokenize(self, text: str) -> list[str]:
        raise NotImplementedError

    def join(self, words: list[str]) -> str:
        raise NotImplementedError

    def synonyms(self, words: list[str]) -> list[str]:
        raise NotImplementedError

    def prepare(self, text: str) -> str:
        return clean_caption(text) if self.clean_before_augment else text

    def remove_stopwords(self, text: str) -> str:
        """With probability remove_stopwords_prob drop stop words; the input if that leaves nothing."""
        if random.random() >= self.remove_stopwords_prob:
            return text
        kept = [w for w in self.tokenize(text) if w.lower() not in self.stopwords]
        return self.join(kept) if kept else text

    def weak(self, text: str) -> str:
        """The weak (global) text: cleaning (optional) and stop-word removal."""
        return self.remove_stopwords(self.prepare(text))

    def strong(self, text: str) -> str:
        """A strong text: weak, then one EDA op when text_augment is on; never empty for a non-empty input."""
        base = self.weak(text)
        if not self.text_augment or sum(self.weights) <= 0:
            return base
        op = random.choices(("identity", "synonym", "swap", "deletion"), weights=self.weights)[0]
        words = self.tokenize(base)
        if op == "synonym":
            words = self.synonyms(words)
        elif op == "swap":
            words = random_swap(words, n=1)
        elif op == "deletion":
            words = random_deletion(words, p=0.1)
        out = self.join(words) if op != "identity" else base
        return out if out.strip() else base


class EnglishTextAugmenter(TextAugmenter):
    """English: nltk's Treebank-style word tokenizer (no punkt data needed), NLTK's English stop words,
    WordNet synonyms."""

    language = "en"

    def __init__(self, **options) -> None:
        super().__init__(load_word_list(STOPWORDS_EN), **options)
        from nltk.tokenize import NLTKWordTokenizer

        self._tokenizer = NLTKWordTokenizer()

    def tokenize(self, text: str) -> list[str]:
        return self._tokenizer.tokenize(text)

    def join(self, words: list[str]) -> str:
        return " ".join(words)

    def synonyms(self, words: list[str]) -> list[str]:
        return synonym_replacement(words, n=1, stopwords=self.stopwords)


class ChineseTextAugmenter(TextAugmenter):
    """Chinese: jieba words (characters when the caption is one word), the stopwords-iso Chinese list,
    swap and deletion; synonym replacement has no Chinese WordNet here, so its weight falls to identity."""

    language = "zh"

    def __init__(self, **options) -> None:
        super().__init__(load_word_list(STOPWORDS_ZH), **options)
        self._jieba = jieba_tokenizer()

    def tokenize(self, text: str) -> list[str]:
        words = [w for w in self._jieba.lcut(text) if w.strip()]
        return list(text.replace(" ", "")) if len(words) < 2 else words

    def join(self, words: list[str]) -> str:
        return "".join(words)

    def synonyms(self, words: list[str]) -> list[str]:
        return words


@functools.lru_cache(maxsize=1)
def jieba_tokenizer():
    """A jieba Tokenizer with its dictionary loaded now (from jieba's cache file, ~1 s), once per process tree:
    forked workers share it in memory and open nothing (not the process-global `jieba.dt`, which loads lazily at
    its first use, in each worker, and which other code may reconfigure)."""
    import jieba

    jieba.setLogLevel(logging.WARNING)
    tokenizer = jieba.Tokenizer()
    tokenizer.initialize()
    return tokenizer


def build_text_augmenter(language: str, **options) -> TextAugmenter:
    """The augmenter of a text tower's language ('en' or 'zh'); options are TextAugmenter's keywords."""
    if language == "en":
        return EnglishTextAugmenter(**options)
    if language == "zh":
        return ChineseTextAugmenter(**options)
    raise ValueError(f"no text augmenter for language {language!r} (have 'en', 'zh')")
