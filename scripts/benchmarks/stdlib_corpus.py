"""The causal-LM benchmark's corpus: the standard library's own documentation, read as text.

    stdlib_documents(s)   pydoc topics (sorted), then the docstrings of a fixed list of modules read
                          with ``ast`` from their source files (nothing is imported), deduplicated
    split_documents       (train, held-out) by document
    corpus_hash           what the pretrained-model cache is keyed on

``s`` is causal_lm.Settings (its ``modules``, ``max_topics`` and ``min_doc_chars``). A sibling of
causal_lm.py, imported as bench_common is.
"""

from __future__ import annotations

import ast
import hashlib
import sysconfig
import tokenize as py_tokenize
from pathlib import Path

# The module list and the docstring readers live in qat.corpus (the training corpus reads them too).
from qat.corpus import MODULES, docstring_docs, module_files  # noqa: F401



def stdlib_documents(s: Settings) -> list[str]:
    """The corpus, in a fixed order: pydoc topics (sorted), then docstrings module by module; deduplicated."""
    from pydoc_data.topics import topics

    keys = sorted(topics)[: s.max_topics]
    docs = [topics[k].strip() for k in keys]
    lib = Path(sysconfig.get_paths()["stdlib"])
    for name in sorted(s.modules):
        for module, path in module_files(lib, name):
            try:
                with py_tokenize.open(path) as f:  # honours the file's encoding cookie
                    tree = ast.parse(f.read())
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            docs.extend(docstring_docs(tree, module))
    seen, out = set(), []
    for doc in docs:
        body = " ".join(doc.split("\n\n", 1)[-1].split())  # dedupe on the text, not on the heading
        if len(body) >= s.min_doc_chars and body not in seen:
            seen.add(body)
            out.append(doc)
    return out


def split_documents(docs: list[str], every: int) -> tuple[list[str], list[str]]:
    """(train, held-out) by document: every ``every``-th document is held out."""
    held = [d for i, d in enumerate(docs) if i % every == every - 1]
    train = [d for i, d in enumerate(docs) if i % every != every - 1]
    return train, held


def corpus_hash(docs: list[str]) -> str:
    h = hashlib.sha256()
    for d in docs:
        h.update(d.encode())
        h.update(b"\0")
    return h.hexdigest()
