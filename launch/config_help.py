"""The config keys as a user sees them: ``python -m launch.train --help`` lists every key with its type,
the schema's default and its docstring, read from the dataclasses themselves (a field's docstring is the
string literal after it, which Python keeps only in the source, hence :mod:`ast`). And the hints for
overrides the shell split or expanded: ``train.steps 10`` (a space for ``=``), or an unquoted glob or
brace pattern that reached the trainer as many words.

Nothing here imports :mod:`launch.config` at module level (it imports this module), nor any engine.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import functools
import inspect
import os
import re
import shlex
import shutil
import textwrap
from dataclasses import dataclass

import yaml

NOTE = (
    "Config keys (set with key=value after the options; values are YAML). The defaults below are the "
    "schema's: model.preset fills model.arch, and --config (default launch/configs/tiny.yaml) and the "
    "overrides replace any of them; --print-config shows the values a run would use. "
    "--help GROUP (or KEY) prints that part with the whole docstrings."
)

MAX_DOC = 300
"""Characters of a key's docstring the full listing shows (about four lines); a longer one shows its
first sentence (whatever the terminal's width, so the listing reads the same everywhere)."""


@dataclass(frozen=True)
class Key:
    """One leaf of the config as users write it (``init.from``, not the field ``init.from_``)."""

    key: str
    type: str
    default: object
    doc: str


@dataclass(frozen=True)
class Group:
    """A section (``train``) or nested section (``finetune.lora``); ``key`` is empty for the top level."""

    key: str
    doc: str
    keys: tuple[Key, ...]


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The attribute docstrings of a dataclass and of its dataclass bases, by field name."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):  # no source (a frozen app): help without the docstrings
            continue
        body = tree.body[0].body
        for stmt, after in zip(body, body[1:], strict=False):
            if (
                isinstance(stmt, ast.AnnAssign)
                and isinstance(stmt.target, ast.Name)
                and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                docs[stmt.target.id] = inspect.cleandoc(after.value.value)
    return docs


def _name(field_name: str) -> str:
    return field_name.rstrip("_")  # ``from_``: ``from`` is a Python keyword; YAML and overrides say ``from``


def groups(schema: object, prefix: str = "", doc: str = "") -> list[Group]:
    """The schema instance's sections, depth first, each with its leaf keys in field order."""
    docs = field_docs(type(schema))
    leaves, nested = [], []
    for f in dataclasses.fields(schema):
        key, value = f"{prefix}{_name(f.name)}", getattr(schema, f.name)
        if dataclasses.is_dataclass(value):
            sub_doc = docs.get(f.name) or inspect.cleandoc(type(value).__doc__ or "")
            nested += groups(value, f"{key}.", sub_doc)
        else:
            kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
            leaves.append(Key(key, kind, value, docs.get(f.name, "")))
    return [Group(prefix[:-1], doc, tuple(leaves)), *nested] if leaves else nested


def leaf_keys(schema: object) -> list[str]:
    """Every dotted key an override can set (``train.steps``, ``model.arch.depth``, ``init.from``)."""
    return [k.key for g in groups(schema) for k in g.keys]


def list_keys(schema: object) -> frozenset[str]:
    """The keys whose value is a list (``sample.prompts``): a suggested value goes in ``[...]``."""
    return frozenset(k.key for g in groups(schema) for k in g.keys if isinstance(k.default, list | tuple))


def yaml_value(value: object) -> str:
    """A default as it would be written after ``key=``."""
    plain = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
    if isinstance(plain, (list, tuple)):
        plain = [dataclasses.astuple(v) if dataclasses.is_dataclass(v) else v for v in plain]
        plain = [list(v) if isinstance(v, tuple) else v for v in plain]
    text = yaml.safe_dump(plain, default_flow_style=True, width=10**9, allow_unicode=True).strip()
    return text.removesuffix("...").strip()


def _plain(doc: str) -> str:
    """reST markup as terminal text: ``x`` and :role:`x` become `x`; lines joined."""
    doc = re.sub(r":\w+:`~?([^`]+)`", r"`\1`", doc)
    return " ".join(doc.replace("``", "`").split())


def _first_sentence(text: str) -> str:
    return re.split(r"(?<=\.)\s+(?=[A-Z`])", text, maxsplit=1)[0]


def format_keys(schema: object, only: str = "") -> str:
    """The help text for the keys: every group, a long docstring cut to its first sentence; or the
    keys at or under ``only``, whole. Raises ValueError naming ``only`` when no key is there."""
    width = shutil.get_terminal_size().columns - 2  # as argparse wraps the options above
    wrap = functools.partial(textwrap.wrap, width=width, subsequent_indent="      ")
    all_groups = groups(schema)
    out = [] if only else ["", *textwrap.wrap(NOTE, width)]
    for g in all_groups:
        keys = [k for k in g.keys if not only or k.key == only or k.key.startswith(only + ".")]
        if not keys:
            continue
        first = _first_sentence(_plain(g.doc)) if g.doc else ""
        heading = f"{g.key or 'top level'}:" + (f" {first}" if first else "")
        out += ["", *textwrap.wrap(heading, width, subsequent_indent="  ")]
        for k in keys:
            head = f"{k.key} ({k.type}, default {yaml_value(k.default)})"
            doc = _plain(k.doc)
            if len(doc) > MAX_DOC and not only:  # the rest: --help KEY
                doc = f"{_first_sentence(doc)} …"
            out += wrap(f"{head}: {doc}" if doc else head, initial_indent="  ")
    if only and not out:
        names = sorted({g.key for g in all_groups if g.key} | set(leaf_keys(schema)))
        close = difflib.get_close_matches(only, names, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]}? " if close else ""
        sections = ", ".join(g.key for g in all_groups if g.key and "." not in g.key)
        raise ValueError(f"--help {only}: no config key or group {only!r}; {hint}groups: {sections}")
    return "\n".join(out)


class ConfigHelp(argparse.Action):
    """``-h/--help [GROUP]``: argparse's usage and options, then the config keys of ``schema`` (a
    dataclass type, instantiated only when help is asked for); with a GROUP or KEY, only those."""

    def __init__(self, option_strings, dest, schema: type, **kwargs):
        super().__init__(option_strings, dest, nargs="?", const="", default=argparse.SUPPRESS, **kwargs)
        self.schema = schema

    def __call__(self, parser, namespace, values, option_string=None):
        only = (values or "").partition("=")[0].strip(".")  # ``--help train.steps=3``: the key
        try:
            text = format_keys(self.schema(), only)
        except ValueError as e:
            parser.exit(2, f"{parser.prog}: error: {e}\n")
        if only:
            parser.print_usage()
        else:
            parser.print_help()
        print(text)
        parser.exit()


# ---- overrides the shell split or expanded ----------------------------------------------------------


def _looks_like_path(word: str) -> bool:
    return "/" in word or os.path.exists(word) or re.search(r"\.[A-Za-z][A-Za-z0-9]{0,4}$", word) is not None


def _glob_for(paths: list[str]) -> str:
    """A glob matching these expanded file names: their common start, ``*``, their common end."""
    head = os.path.commonprefix(paths)
    room = min(len(p) for p in paths) - len(head)  # the end may not overlap the start
    tail = os.path.commonprefix([p[::-1] for p in paths])[::-1][-room:] if room > 0 else ""
    glob = f"{head}*{tail}"
    return f'"{glob}"' if glob[0] == "*" else glob  # a leading * is a YAML alias: quoted for YAML too


def _as_key(word: str, keys: list[str]) -> tuple[str, str] | None:
    """``(key, glued value)`` when ``word`` is a config key, a key with its value glued on
    (``train.steps10``) or close to a key (``trian.steps``); None otherwise."""
    bare = re.sub(r"(\.\d+)+$", "", word)  # ``sample.prompts.0``: an item of a list key
    if bare in keys:
        return word, ""
    for key in keys:
        rest = word[len(key) :]
        if word.startswith(key) and rest[:1].isdigit():
            return key, rest
    if "/" in word or os.path.exists(word):
        return None
    close = difflib.get_close_matches(word, keys, n=1, cutoff=0.8)
    return (close[0], "") if close else None


def override_error(items: list[str], i: int, keys: list[str], lists: frozenset[str] = frozenset()) -> str:
    """The message for ``items[i]``, an override without ``key=``: what the shell probably did to it.

    Args:
        items: all the override words, in order.
        i: the index of the bad one.
        keys: the config's leaf keys (:func:`leaf_keys`).
        lists: those of them whose value is a list (:func:`list_keys`).
    """
    word = items[i]
    said = f"override {word!r}: expected key=value"
    prev = items[i - 1] if i > 0 else ""
    if prev.endswith("=") and not word.startswith("="):  # ``train.steps= 10``
        return f"{said}; did you mean {shlex.quote(prev + word)}? (no space after '=')"
    if word.startswith("=") and prev and "=" not in prev:  # ``train.steps =10``
        return f"{said}; did you mean {shlex.quote(prev + word)}? (no space before '=')"
    found = _as_key(word, keys)
    if found is not None:
        key, glued = found
        if glued:
            return f"{said}; did you mean {shlex.quote(f'{key}={glued}')}?"
        rest = items[i + 1 :]
        if rest[:1] == ["="]:  # ``train.steps = 10``
            rest = rest[1:]
        elif rest[:1] and rest[0].startswith("="):
            rest = [rest[0][1:], *rest[1:]]
        values = []
        for w in rest:
            if "=" in w:
                break
            values.append(w)
        if not values:
            return f"{said}, and no value follows: write {key}=VALUE (no spaces around '=')"
        if len(values) > 1 and all(_looks_like_path(v) for v in values) and _alike(values):
            suggestion = shlex.quote(f"{key}={_glob_for(values)}")
            return (
                f"override {word!r} is followed by {len(values)} file names; did you mean {suggestion}? "
                "(quoted: unquoted, the shell expands a glob or brace pattern into separate words)"
            )
        value = " ".join(values)  # words of one value (a caption) the shell split: quoted, they stay one
        if key in lists:
            value = f"[{value}]"
        return f"{said}; did you mean {shlex.quote(f'{key}={value}')}? (no spaces around '=')"
    if _looks_like_path(word):
        return _stray_files(items, i)
    return said + " (e.g. train.steps=100)"


def _stray_files(items: list[str], i: int) -> str:
    """Words that are file names: what the shell made of an unquoted pattern or ``$(ls …)`` after
    ``key=`` (the first name stays glued to it), or a config file given without ``--config``."""
    files = []
    for w in items[i:]:
        if "=" in w or not _looks_like_path(w):
            break
        files.append(w)
    if len(files) == 1 and files[0].endswith((".yaml", ".yml")):
        return f"override {files[0]!r}: expected key=value; a config file goes after --config"
    key, eq, first = items[i - 1].partition("=") if i > 0 else ("", "", "")
    if eq and _alike([first, *files]):
        named = " ".join(shlex.quote(f) for f in files[:3]) + (" …" if len(files) > 3 else "")
        suggestion = shlex.quote(f"{key}={_glob_for([first, *files])}")
        return (
            f"overrides {named} have no '=': they look like file names the shell expanded from an unquoted "
            f"glob, brace pattern or $(…) in {key}= (only the first reached it); quote the override: "
            f"{suggestion}"
        )
    return (
        f"override {files[0]!r}: expected key=value; it looks like a file name (an unquoted glob or brace "
        "pattern?): name the key and quote the override, e.g. 'data.shards=shards/*.tar'"
    )


def _alike(paths: list[str]) -> bool:
    """Whether these could be one pattern's expansion: one directory, one extension."""
    return len({(os.path.dirname(p), os.path.splitext(p)[1]) for p in paths}) == 1


def expanded_error(items: list[str]) -> str | None:
    """The message when consecutive overrides set one key to different file names: the shell expanded
    ``key=dir/{000..003}.tar`` (or a glob) into one override each, and only the last would count."""
    i = 0
    while i < len(items):
        key, _, value = items[i].partition("=")
        run = [value]
        while i + len(run) < len(items):
            k, eq, v = items[i + len(run)].partition("=")
            if not eq or k != key:
                break
            run.append(v)
        if (
            len(run) > 1
            and len(set(run)) == len(run)
            and all(os.path.isfile(v) for v in run)  # what an expansion yields; `run.dir=a run.dir=b` is not
            and _alike(run)
        ):
            suggestion = shlex.quote(f"{key}={_glob_for(run)}")
            listed = ", ".join(run[:3]) + (", …" if len(run) > 3 else "")
            return (
                f"{key} is set {len(run)} times in a row ({listed}): the shell expanded an unquoted brace or "
                f"glob pattern into one override each and only the last would count; quote it: {suggestion}"
            )
        i += len(run)
    return None
