"""qat.corpus: the Python corpus's train / dev splits are disjoint by source and by sentence,
deterministic, never read the operating system's text; the out-of-domain test split is a fixed,
unique sample that shares no sentence with them; the cleaner keeps prose and drops code."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from qat import corpus

_OPENED: list[str] = []
_WATCHING = [False]


def _audit(event, args):  # an audit hook cannot be removed: it records only while a test watches
    if _WATCHING[0] and event == "open" and args and isinstance(args[0], (str, bytes, Path)):
        _OPENED.append(str(args[0]))


sys.addaudithook(_audit)


def _clear_caches():
    corpus._python_splits.cache_clear()
    corpus.python_documents.cache_clear()


@pytest.fixture(scope="module")
def splits():
    _clear_caches()
    return {s: corpus.corpus_sentences(s) for s in corpus.SPLITS}


@pytest.fixture(scope="module")
def rebuilt(splits):
    """The corpus built a second time from scratch (caches cleared), with every file it opens recorded."""
    _clear_caches()
    _OPENED.clear()
    _WATCHING[0] = True
    try:
        again = {s: corpus.corpus_sentences(s) for s in corpus.SPLITS}
    finally:
        _WATCHING[0] = False
    return again, list(_OPENED)


def test_train_and_dev_never_open_os_text(rebuilt):
    """Every file the train / dev corpus is built from is opened while watched: none is under
    /usr/share, the text reserved for the out-of-domain test split."""
    opened = rebuilt[1]
    assert len(opened) > 100  # the hook saw the stdlib's source files being read
    assert not [p for p in opened if p.startswith("/usr/share")]


def test_splits_are_disjoint_by_source_and_sentence(splits):
    """No dev sentence is produced by a train source (module / topic), up to case and punctuation."""
    train_keys = {corpus.dedupe_key(s) for s in splits["train"]}
    dev_keys = {corpus.dedupe_key(s) for s in splits["dev"]}
    assert not train_keys & dev_keys
    from_train_sources = set()
    for source, text in corpus.python_documents():
        if corpus.split_of(source) == "train":
            from_train_sources.update(corpus.dedupe_key(s) for s in corpus.prose_sentences(text))
    assert not dev_keys & from_train_sources
    # Sizes: a corpus worth training on, dev about 1/DEV_EVERY of it (the split is by module hash).
    assert len(splits["train"]) > 5000 and 300 < len(splits["dev"]) < len(splits["train"]) / 3
    assert len(set(splits["train"])) == len(splits["train"])


def test_deterministic(splits, rebuilt):
    assert rebuilt[0] == splits  # two builds from scratch, sentence for sentence
    a, b = corpus.corpus_sentences("dev", 50, seed=1), corpus.corpus_sentences("dev", 50, seed=2)
    assert a == corpus.corpus_sentences("dev", 50, seed=1) and a != b and len(a) == 50
    assert corpus.split_of("asyncio.tasks") == corpus.split_of("asyncio.tasks")


def test_sentences_are_prose(splits):
    for s in splits["train"][:2000] + splits["dev"]:
        assert len([w for w in s.split() if any(c.isalpha() for c in w)]) >= 6, s
        assert ">>>" not in s and "==" not in s and s[-1] in ".!?", s


def test_cleaner_keeps_prose_drops_code():
    doc = ("Return the sum of the two numbers it is given.\n\n"
           ">>> add(1, 2)\n3\n\n"
           "    def add(a, b): return a + b\n\n"
           "Uses :func:`operator.add` under the hood for every pair it sees. See ``x=1`` too.\n"
           "Too short here.")
    assert corpus.prose_sentences(doc) == ["Return the sum of the two numbers it is given.",
                                           "Uses operator.add under the hood for every pair it sees."]
    debian = ("Files: *\nCopyright: 2001 Some One\n 2002 Other One\nLicense: MIT\n"
              " Permission is hereby granted to use this software for any purpose at all.\n .\n"
              " The above notice shall be included in all copies of the software.\n")
    assert corpus.prose_sentences(corpus.debian_copyright_prose(debian)) == [
        "Permission is hereby granted to use this software for any purpose at all.",
        "The above notice shall be included in all copies of the software."]


def test_unknown_split_says_what_to_use():
    with pytest.raises(ValueError, match="use 'train' or 'dev'"):
        corpus.corpus_sentences("test")


@pytest.mark.skipif(not corpus.os_text_files(), reason="no /usr/share licence or copyright files here")
def test_ood_split_is_a_fixed_unique_sample_apart_from_the_corpus(splits):
    test = corpus.ood_test_sentences(1024, seed=0)
    assert len(test) == 1024 == len(set(corpus.dedupe_key(s) for s in test))
    assert test == corpus.ood_test_sentences(1024, seed=0) and test != corpus.ood_test_sentences(1024, seed=1)
    python_keys = {corpus.dedupe_key(s) for split in splits.values() for s in split}
    assert not python_keys & {corpus.dedupe_key(s) for s in test}


def test_ood_split_without_os_text_says_why(tmp_path):
    with pytest.raises(ValueError, match="no out-of-domain text"):
        corpus.ood_test_sentences(roots=(str(tmp_path / "a"), str(tmp_path / "b")))


def test_corpus_is_a_training_dataset():
    """`qat train --dataset corpus`: train text from the train split, held-out text from dev."""
    from qat.trainers.data import load_raw

    assert load_raw("corpus", split="train")["text"] == corpus.corpus_sentences("train")
    assert load_raw("corpus", split="eval")["text"] == corpus.corpus_sentences("dev")
