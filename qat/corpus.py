"""An offline English corpus built from what ships with Python and its installed packages, with
disjoint ``train`` / ``dev`` splits, and an out-of-domain ``test`` split from a different source.

    corpus_sentences("train" | "dev", n, seed)  sentences of pydoc_data.topics, standard-library docstrings
                                                and the docstrings of a fixed list of installed packages,
                                                split by source module (a module's sentences are all in one
                                                split, so near-duplicates inside a module never straddle)
    ood_test_sentences(n, seed)                 sentences of the licence and copyright text the operating
                                                system ships (/usr/share): for the final report ONLY

Nothing that trains or tunes may read the ``test`` split: the project reserves the operating system's text
for independent evaluation, and the ``train`` / ``dev`` functions never open a file under /usr/share
(tests/test_corpus.py checks that with an audit hook). Source files are read with ``ast`` (nothing is
imported), in sorted order, so a corpus is a function of the installed versions alone; ``corpus_info``
gives its sizes and hash.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import random
import re
import sysconfig
import tokenize as py_tokenize
from pathlib import Path

# Top-level modules and packages of Lib/ whose docstrings form the corpus, fixed so that the corpus
# does not grow with whatever a Python version adds (a name missing from this Python is skipped).
# Left out: tests, IDLE, lib2to3, turtledemo, ensurepip, encodings, private modules, pydoc_data
# (read separately, as the topics).
MODULES = (
    "abc", "aifc", "argparse", "ast", "asynchat", "asyncio", "asyncore", "base64", "bdb", "bisect", "bz2",
    "cProfile", "calendar", "cgi", "cgitb", "chunk", "cmd", "code", "codecs", "codeop", "collections",
    "colorsys", "compileall", "concurrent", "configparser", "contextlib", "contextvars", "copy", "copyreg",
    "crypt", "csv", "ctypes", "curses", "dataclasses", "datetime", "dbm", "decimal", "difflib", "dis",
    "distutils", "doctest", "email", "enum", "filecmp", "fileinput", "fnmatch", "fractions", "ftplib",
    "functools", "genericpath", "getopt", "getpass", "gettext", "glob", "graphlib", "gzip", "hashlib",
    "heapq", "hmac", "html", "http", "imaplib", "imghdr", "imp", "importlib", "inspect", "io", "ipaddress",
    "json", "keyword", "linecache", "locale", "logging", "lzma", "mailbox", "mailcap", "mimetypes",
    "modulefinder", "multiprocessing", "netrc", "nntplib", "ntpath", "nturl2path", "numbers", "opcode",
    "operator", "optparse", "os", "pathlib", "pdb", "pickle", "pickletools", "pipes", "pkgutil", "platform",
    "plistlib", "poplib", "posixpath", "pprint", "profile", "pstats", "pty", "py_compile", "pyclbr", "pydoc",
    "queue", "quopri", "random", "re", "reprlib", "rlcompleter", "runpy", "sched", "secrets", "selectors",
    "shelve", "shlex", "shutil", "signal", "site", "smtpd", "smtplib", "sndhdr", "socket", "socketserver",
    "sqlite3", "sre_compile", "sre_constants", "sre_parse", "ssl", "stat", "statistics", "string",
    "stringprep", "struct", "subprocess", "sunau", "symtable", "sysconfig", "tabnanny", "tarfile",
    "telnetlib", "tempfile", "textwrap", "threading", "timeit", "tkinter", "token", "tokenize", "tomllib",
    "trace", "traceback", "tracemalloc", "tty", "turtle", "types", "typing", "unittest", "urllib", "uu",
    "uuid", "venv", "warnings", "wave", "weakref", "webbrowser", "wsgiref", "xdrlib", "xml", "xmlrpc",
    "zipapp", "zipfile", "zipimport", "zoneinfo",
)


def signature(node) -> str:
    try:
        return ast.unparse(node.args)
    except Exception:  # an odd default value: the name alone still reads as a heading
        return ""


def docstring_docs(tree: ast.Module, module: str) -> list[str]:
    """Module, class and function/method docstrings, each headed by its qualified name (as help() shows)."""
    docs = []
    if doc := ast.get_docstring(tree):
        docs.append(f"{module}\n\n{doc}")

    def visit(body, prefix):
        for node in body:
            if isinstance(node, ast.ClassDef):
                if doc := ast.get_docstring(node):
                    bases = ", ".join(ast.unparse(b) for b in node.bases)
                    docs.append(f"class {prefix}{node.name}({bases})\n\n{doc}")
                visit(node.body, f"{prefix}{node.name}.")
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if doc := ast.get_docstring(node):
                    docs.append(f"{prefix}{node.name}({signature(node)})\n\n{doc}")

    visit(tree.body, f"{module}.")
    return docs


def module_files(lib: Path, name: str) -> list[tuple[str, Path]]:
    """(dotted module name, source file) of a top-level module or every file of a package, tests left out."""
    if (lib / f"{name}.py").is_file():
        return [(name, lib / f"{name}.py")]
    if not (lib / name / "__init__.py").is_file():
        return []
    out = []
    for path in sorted((lib / name).rglob("*.py")):
        parts = path.relative_to(lib).with_suffix("").parts
        if any(p in ("test", "tests") or p.startswith("test_") for p in parts):
            continue
        out.append((".".join(parts[:-1] if parts[-1] == "__init__" else parts), path))
    return out



# Installed packages (qat's own dependencies, so always present) whose docstrings join the corpus, as
# dotted prefixes: a whole package, or the parts of torch whose docstrings are prose (its other files
# are mostly kernels and internals).
PACKAGES = (
    "torch.nn", "torch.optim", "torch.utils.data", "torch.distributions", "torch.autograd",
    "peft", "accelerate", "datasets", "huggingface_hub", "safetensors", "yaml",
)
DEV_EVERY = 8  # about one source module in DEV_EVERY goes to dev (chosen by a hash of its name)
SPLITS = ("train", "dev")
OOD_ROOTS = ("/usr/share/common-licenses", "/usr/share/doc")

_RST_ROLE = re.compile(r":[\w:.-]+:`~?([^`<]*?)(?:\s*<[^`]*>)?`")  # :class:`~a.B` -> a.B
_CODE_LINE = re.compile(r"^\s*(>>>|\.\.\.|\$ |[#%]|def |class |import |from \S+ import|return\b|@)")
_STARTS = re.compile(r"[\"'(\[]*[A-Z0-9]")  # a capital, perhaps after a quote or "(a)"
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(]?[A-Z])")
_NOT_PROSE = re.compile(r">>>|[{}\\|]|==|->|__|\w\(|\w\.\w+\(|https?:|www\.|@\w|\w=\w|\.\.\.|:$")


# ---------------------------------------------------------------------------------------- cleaning
def is_prose(sentence: str, min_words: int = 6) -> bool:
    """An English sentence: capitalised (or quoted / numbered), ends like a sentence, >= min_words words of letters, no code."""
    words = [w for w in sentence.split() if any(c.isalpha() for c in w)]
    if len(words) < min_words or len(sentence) > 500 or not _STARTS.match(sentence):
        return False
    if sentence[-1] not in ".!?" or _NOT_PROSE.search(sentence):
        return False
    visible = [c for c in sentence if not c.isspace()]
    letters = [c for c in visible if c.isalpha()]
    english = sum(c.isascii() for c in letters) >= 0.97 * len(letters)  # not a translated licence
    return english and len(letters) >= 0.8 * len(visible)


def prose_sentences(text: str, min_words: int = 6) -> list[str]:
    """The prose sentences of a docstring or document: code lines (doctest, shell, definitions, lines
    more symbol than letter) are dropped, reST roles and literals unwrapped, paragraphs re-joined."""
    sentences = []
    for paragraph in re.split(r"\n\s*\n", text):
        lines = [ln for ln in paragraph.splitlines() if ln.strip() and not _CODE_LINE.match(ln)]
        joined = " ".join(ln.strip() for ln in lines)
        joined = _RST_ROLE.sub(r"\1", joined).replace("``", "").replace("`", "").replace("**", "")
        for sentence in _SENTENCE_END.split(joined):
            sentence = sentence.strip()
            if is_prose(sentence, min_words):
                sentences.append(sentence)
    return sentences


def dedupe_key(sentence: str) -> str:
    """Sentences equal up to case, digits and punctuation count as one."""
    return " ".join(re.findall(r"[a-z]+", sentence.lower()))


# ---------------------------------------------------------------------------------------- sources
def _parse(path: Path):
    try:
        with py_tokenize.open(path) as f:  # honours the file's encoding cookie
            return ast.parse(f.read())
    except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
        return None


def package_files(prefix: str) -> list[tuple[str, Path]]:
    """(dotted module, source file) of an installed package (or a dotted part of one), found without
    importing it; tests and private (_x) modules left out; [] when the package is not installed."""
    import importlib.util

    top, *rest = prefix.split(".")
    spec = importlib.util.find_spec(top)  # a top-level find_spec imports nothing
    if spec is None or not spec.submodule_search_locations:
        return []
    root = Path(list(spec.submodule_search_locations)[0]).joinpath(*rest)
    out = []
    for path in sorted(root.rglob("*.py")):
        parts = (top, *path.relative_to(root.parents[len(rest)]).with_suffix("").parts[1:])
        if any(p in ("test", "tests") or p.startswith(("test_", "_")) and p != "__init__" for p in parts):
            continue
        out.append((".".join(parts[:-1] if parts[-1] == "__init__" else parts), path))
    return out


@functools.lru_cache(maxsize=1)
def python_documents() -> tuple[tuple[str, str], ...]:
    """(source, text) in a fixed order: pydoc topics, standard-library docstrings, package docstrings.
    ``source`` (a topic or a module) is the unit the train / dev split keeps together."""
    from pydoc_data.topics import topics

    docs = [(f"pydoc:{key}", topics[key]) for key in sorted(topics)]
    lib = Path(sysconfig.get_paths()["stdlib"])
    files = [mf for name in sorted(MODULES) for mf in module_files(lib, name)]
    files += [mf for prefix in PACKAGES for mf in package_files(prefix)]
    for module, path in files:
        if (tree := _parse(path)) is not None:
            docs.extend((module, doc) for doc in docstring_docs(tree, module))
    return tuple(docs)


def split_of(source: str) -> str:
    """'dev' for about one source in DEV_EVERY, by a hash of its name (stable across runs and machines)."""
    digest = int.from_bytes(hashlib.sha256(source.encode()).digest()[:8], "big")
    return "dev" if digest % DEV_EVERY == 0 else "train"


@functools.lru_cache(maxsize=4)
def _python_splits(min_words: int) -> dict[str, tuple[str, ...]]:
    """{split: sentences in corpus order}: deduplicated within a split, and a dev sentence whose
    dedupe_key is in train is dropped (train keeps it)."""
    by_split = {s: [] for s in SPLITS}
    for source, text in python_documents():
        by_split[split_of(source)].extend(prose_sentences(text, min_words))
    seen, out = set(), {}
    for split in SPLITS:  # train first: an overlap is removed from dev
        kept = []
        for sentence in by_split[split]:
            if (key := dedupe_key(sentence)) not in seen:
                seen.add(key)
                kept.append(sentence)
        out[split] = tuple(kept)
    return out


def _sample(sentences, n: int | None, seed: int) -> list[str]:
    chosen = list(sentences)
    random.Random(seed).shuffle(chosen)
    return chosen if n is None else chosen[:n]


def corpus_sentences(split: str = "train", n: int | None = None, seed: int = 0, min_words: int = 6) -> list[str]:
    """``n`` sentences (all when None) of the Python corpus's ``train`` or ``dev`` split, shuffled by
    ``seed``; the two splits share no source module and no sentence."""
    if split not in SPLITS:
        raise ValueError(f"corpus split {split!r} does not exist: use 'train' or 'dev' "
                         "(the out-of-domain test split is ood_test_sentences)")
    return _sample(_python_splits(min_words)[split], n, seed)


def corpus_info(min_words: int = 6) -> dict:
    """Sizes and a hash of each split (what a report names so a run can be matched to its data)."""
    info = {}
    for split, sentences in _python_splits(min_words).items():
        h = hashlib.sha256("\0".join(sentences).encode()).hexdigest()[:12]
        info[split] = {"sentences": len(sentences), "sha256": h}
    return info


# ---------------------------------------------------------------------------------------- OOD test
def os_text_files(roots=OOD_ROOTS) -> list[Path]:
    """The licences and per-package copyright files the operating system ships, each file once."""
    licences, docs = Path(roots[0]), Path(roots[1])
    files = sorted(p for p in licences.glob("*") if p.is_file()) if licences.is_dir() else []
    files += sorted(docs.glob("*/copyright")) if docs.is_dir() else []
    unique, seen = [], set()
    for path in files:
        if path.is_file() and (real := path.resolve()) not in seen:
            seen.add(real)
            unique.append(path)
    return unique


_LIST_FIELD = re.compile(r"^(Files|Copyright|Upstream-[\w-]+|Source|Format|Format-Specification|Name|Maintainer)"
                         r":.*(\n[ \t].*)*", re.M)
_TEXT_FIELD = re.compile(r"^(License|Comment|Disclaimer):.*$", re.M)


def debian_copyright_prose(text: str) -> str:
    """The prose of a machine-readable copyright file: list fields (Files, Copyright, ...) and their
    continuation lines removed, a text field's first line (a licence name) dropped, " ." as a blank line;
    a plain licence file passes through unchanged."""
    text = _LIST_FIELD.sub("\n", text)
    text = _TEXT_FIELD.sub("\n", text)
    return re.sub(r"^\s*\.$", "", text, flags=re.M)


def ood_test_sentences(n: int | None = 1024, seed: int = 0, min_words: int = 6, roots=OOD_ROOTS) -> list[str]:
    """``n`` unique prose sentences of the operating system's licence / copyright text, sampled by
    ``seed`` (all when None); sentences also in the Python corpus are left out. For the final report
    only: nothing in qat trains or tunes on them."""
    files = os_text_files(roots)
    if not files:
        raise ValueError(f"no out-of-domain text: none of {list(roots)} holds licence or copyright files "
                         "(this split needs a Debian-style /usr/share; run on such a system or pass roots)")
    python_keys = {dedupe_key(s) for split in _python_splits(min_words).values() for s in split}
    seen, sentences = set(python_keys), []
    for path in files:
        text = path.read_text(errors="replace")
        text = debian_copyright_prose(text)
        for sentence in prose_sentences(text, min_words):
            if (key := dedupe_key(sentence)) not in seen:
                seen.add(key)
                sentences.append(sentence)
    return _sample(sentences, n, seed)
