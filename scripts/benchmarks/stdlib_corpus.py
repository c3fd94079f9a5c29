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


def _signature(node) -> str:
    try:
        return ast.unparse(node.args)
    except Exception:  # an odd default value: the name alone still reads as a heading
        return ""


def _docstring_docs(tree: ast.Module, module: str) -> list[str]:
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
                    docs.append(f"{prefix}{node.name}({_signature(node)})\n\n{doc}")

    visit(tree.body, f"{module}.")
    return docs


def _module_files(lib: Path, name: str) -> list[tuple[str, Path]]:
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


def stdlib_documents(s: Settings) -> list[str]:
    """The corpus, in a fixed order: pydoc topics (sorted), then docstrings module by module; deduplicated."""
    from pydoc_data.topics import topics

    keys = sorted(topics)[: s.max_topics]
    docs = [topics[k].strip() for k in keys]
    lib = Path(sysconfig.get_paths()["stdlib"])
    for name in sorted(s.modules):
        for module, path in _module_files(lib, name):
            try:
                with py_tokenize.open(path) as f:  # honours the file's encoding cookie
                    tree = ast.parse(f.read())
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            docs.extend(_docstring_docs(tree, module))
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
