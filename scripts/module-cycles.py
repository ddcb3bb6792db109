#!/usr/bin/env python3
"""Finds import circles between the modules of each crate in the workspace.

What it checks: for every workspace member (from the root Cargo.toml) and
each of its crate roots (src/lib.rs, src/main.rs, or the [lib]/[[bin]] paths),
it builds the module tree from the files (`mod foo;` -> `foo.rs` or
`foo/mod.rs` beside the declaring file's module directory, `#[path]` honoured;
inline `mod foo { ... }` bodies too) and the graph of references between those
modules, then reports every strongly connected component of more than one
module, as the shortest circles through its edges.

How an edge is defined: A -> B when non-test code of module A refers to an
item defined in module B, and neither holds the other; the edge is then
counted between the two subtrees, each end lifted to its ancestor just below
their lowest common ancestor (so `options` using `providers::apns` is an
edge options -> providers). A module and its submodules are one unit: a
child using its parent's private items and the parent calling into the
child is how a module is split into files, not a circle. References are:
  * a private `use` that imports an item of B (`use crate::x::Y`, `use
    super::Y`, `use self::y::Z`, grouped trees `use crate::{a::{b, c}, d}`,
    renames, `as _` trait imports);
  * a path in code (`crate::x::f(..)`, `super::y::Z`, `child::f()`, or a path
    through an imported name, e.g. `statements::Prepared` after
    `use super::statements`), resolved segment by segment to the deepest
    existing module; a path ending in an item resolves to the module that
    holds the item, following `use`/`pub use` re-exports to where the item is
    defined (`crate::Error` re-exported from `error` counts as `error`);
  * a `pub use` (or `pub(crate) use` ...) re-export is NOT an edge by itself,
    nor is a `mod child;` declaration: a re-exported name counts only where
    the re-exporting module's own code uses it (same for glob imports).
Test code is ignored (it may reach anywhere): modules named `tests` (inline
or `tests.rs`) and everything under them, and any item, field, statement or
module under `#[cfg(test)]` (also `all(test, ..)`), `#[test]` or `#[x::test]`.
Comments (doc comments included) and string/char literals are stripped before
anything is read, so doc text and string contents never count. Not seen:
macro-expanded code (textual `macro_rules!` scoping, paths built by proc
macros) and paths written inside string literals (e.g. serde `with = "..."`).

Usage: python3 scripts/module-cycles.py [--edges] [--crate NAME]
  (any working directory: the workspace root is the script's parent folder)
Exit status: 1 if any circle was found, 0 if none, 2 on a setup error.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import tomllib
from collections import deque
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# --------------------------------------------------------------------------
# Lexer: identifiers, punctuation, literals (kept only as opaque tokens),
# comments dropped.
# --------------------------------------------------------------------------


@dataclass(slots=True)
class Tok:
    kind: str  # 'id', 'p' (punct), 'str', 'char', 'num', 'life'
    v: str
    line: int


MULTI_PUNCT = ("::", "->", "=>", "..=", "...", "..", "<=", ">=", "==", "!=", "&&", "||", "+=", "-=",
               "*=", "/=", "%=", "^=", "&=", "|=")
OPENERS = {"(": ")", "[": "]", "{": "}"}
CLOSERS = {")", "]", "}"}


def _is_id_start(c: str) -> bool:
    return c == "_" or c.isalpha()


def _is_id_char(c: str) -> bool:
    return c == "_" or c.isalnum()


def lex(src: str) -> list[Tok]:
    toks: list[Tok] = []
    i, n, line = 0, len(src), 1

    def skip_quoted(j: int, quote: str) -> int:
        """j is just past the opening quote; returns index past the closing one."""
        nonlocal line
        while j < n:
            c = src[j]
            if c == "\\":
                if j + 1 < n and src[j + 1] == "\n":
                    line += 1
                j += 2
                continue
            if c == "\n":
                line += 1
            if c == quote:
                return j + 1
            j += 1
        return j

    def skip_raw(j: int) -> int | None:
        """j at the `#`s or `"` after an r/br/cr prefix; returns index past the raw string."""
        nonlocal line
        k = j
        while k < n and src[k] == "#":
            k += 1
        if k >= n or src[k] != '"':
            return None
        hashes = k - j
        close = '"' + "#" * hashes
        end = src.find(close, k + 1)
        end = n if end < 0 else end + len(close)
        line += src.count("\n", k, end)
        return end

    while i < n:
        c = src[i]
        if c == "\n":
            line += 1
            i += 1
            continue
        if c.isspace():
            i += 1
            continue
        if src.startswith("//", i):
            j = src.find("\n", i)
            i = n if j < 0 else j
            continue
        if src.startswith("/*", i):
            depth, j = 1, i + 2
            while j < n and depth:
                if src.startswith("/*", j):
                    depth += 1
                    j += 2
                elif src.startswith("*/", j):
                    depth -= 1
                    j += 2
                else:
                    if src[j] == "\n":
                        line += 1
                    j += 1
            i = j
            continue
        start_line = line
        # String-ish literals with prefixes: b"", c"", r"", r#""#, br"", cr"", b''
        if c in "bcr":
            j = i + 1
            if c in "bc" and j < n and src[j] == "r":
                j += 1
            if src[j - 1] == "r" or (c == "r"):
                if j < n and (src[j] == '"' or (src[j] == "#" and j + 1 < n and src[j + 1] in '#"')):
                    end = skip_raw(j)
                    if end is not None:
                        toks.append(Tok("str", "", start_line))
                        i = end
                        continue
            if c in "bc" and i + 1 < n and src[i + 1] == '"':
                i = skip_quoted(i + 2, '"')
                toks.append(Tok("str", "", start_line))
                continue
            if c == "b" and i + 1 < n and src[i + 1] == "'":
                i = skip_quoted(i + 2, "'")
                toks.append(Tok("char", "", start_line))
                continue
            if c == "r" and src.startswith("r#", i) and i + 2 < n and _is_id_start(src[i + 2]):
                j = i + 2
                while j < n and _is_id_char(src[j]):
                    j += 1
                toks.append(Tok("id", src[i + 2:j], start_line))
                i = j
                continue
        if c == '"':
            j = i + 1
            i = skip_quoted(j, '"')
            toks.append(Tok("str", src[j:i - 1], start_line))
            continue
        if c == "'":
            if i + 1 < n and src[i + 1] == "\\":
                i = skip_quoted(i + 1, "'")
                toks.append(Tok("char", "", start_line))
                continue
            if i + 2 < n and src[i + 2] == "'":
                i += 3
                toks.append(Tok("char", "", start_line))
                continue
            j = i + 1
            while j < n and _is_id_char(src[j]):
                j += 1
            toks.append(Tok("life", src[i:j], start_line))
            i = j
            continue
        if _is_id_start(c):
            j = i + 1
            while j < n and _is_id_char(src[j]):
                j += 1
            toks.append(Tok("id", src[i:j], start_line))
            i = j
            continue
        if c.isdigit():
            j = i + 1
            while j < n and (_is_id_char(src[j]) or (src[j] == "." and j + 1 < n and src[j + 1].isdigit()
                                                   and src[j - 1] != ".")):
                j += 1
            toks.append(Tok("num", src[i:j], start_line))
            i = j
            continue
        for p in MULTI_PUNCT:
            if src.startswith(p, i):
                toks.append(Tok("p", p, start_line))
                i += len(p)
                break
        else:
            toks.append(Tok("p", c, start_line))
            i += 1
    return toks


def bracket_matches(toks: list[Tok]) -> dict[int, int]:
    """Index of each opener -> index of its closer (and closer -> opener)."""
    match: dict[int, int] = {}
    stack: list[int] = []
    for k, t in enumerate(toks):
        if t.kind != "p":
            continue
        if t.v in OPENERS:
            stack.append(k)
        elif t.v in CLOSERS:
            # Tolerate unbalanced input: pop to the nearest matching opener.
            while stack and OPENERS[toks[stack[-1]].v] != t.v:
                stack.pop()
            if stack:
                o = stack.pop()
                match[o] = k
                match[k] = o
    return match


# --------------------------------------------------------------------------
# Module tree
# --------------------------------------------------------------------------


@dataclass(eq=False)
class Module:
    path: tuple[str, ...]
    file: str  # file holding this module's body
    child_dir: str  # where `mod x;` of this module looks for x.rs / x/mod.rs
    parent: Module | None
    toks: list[Tok] = field(default_factory=list)  # own non-test tokens
    children: dict[str, Module] = field(default_factory=dict)
    is_test: bool = False
    inline: bool = False  # an inline `mod x { ... }` block
    decls: list = field(default_factory=list)  # [(name, line, #[path] or None)] of `mod x;`
    # analysis
    defined: set[str] = field(default_factory=set)
    bindings: dict[str, list] = field(default_factory=dict)  # name -> [UseLeaf]
    globs: list = field(default_factory=list)  # [UseLeaf]
    idents: dict[str, int] = field(default_factory=dict)  # name -> first line used in code
    paths: list = field(default_factory=list)  # [(segments, line)]
    uses: list = field(default_factory=list)  # [UseLeaf]

    @property
    def name(self) -> str:
        return "::".join(self.path) if self.path else "crate"


@dataclass(slots=True)
class UseLeaf:
    segs: list[str]  # full path, e.g. ['crate', 'store', 'Member']
    binding: str | None  # name bound ('_' for `as _`, None for glob)
    glob: bool
    public: bool
    line: int


def attr_is_test(toks: list[Tok], a: int, b: int) -> bool:
    """toks[a:b] is the inside of `#[ ... ]`."""
    segs: list[str] = []
    k = a
    while k < b and (toks[k].kind == "id" or toks[k].v == "::"):
        if toks[k].kind == "id":
            segs.append(toks[k].v)
        k += 1
    if not segs:
        return False
    if segs == ["cfg"] and k < b and toks[k].v == "(":
        pred, _ = _cfg_pred(toks, k + 1, b)
        return pred
    return segs[-1] == "test"  # #[test], #[tokio::test], #[tokio::test(flavor = ..)]


def _cfg_pred(toks: list[Tok], k: int, b: int) -> tuple[bool, int]:
    """Parses one cfg predicate at k; returns (needs_test, index after it)."""
    if k >= b:
        return False, k
    t = toks[k]
    if t.kind == "id" and k + 1 < b and toks[k + 1].v == "(" and t.v in ("all", "any", "not"):
        k += 2
        subs: list[bool] = []
        while k < b and toks[k].v != ")":
            val, k = _cfg_pred(toks, k, b)
            subs.append(val)
            if k < b and toks[k].v == ",":
                k += 1
        k += 1  # ')'
        if t.v == "all":
            return any(subs), k
        if t.v == "any":
            return bool(subs) and all(subs), k
        return False, k
    if t.kind == "id":
        k += 1
        if k < b and toks[k].v == "=":
            return False, k + 2
        return t.v == "test", k
    return False, k + 1


QUALIFIERS = {"pub", "default", "unsafe", "async", "extern", "crate"}
BRACE_HEADS = {"fn", "impl", "trait", "mod", "enum", "union", "struct", "macro_rules", "if", "match", "for",
               "while", "loop", "{"}


def skip_item(toks: list[Tok], i: int, end: int, match: dict[int, int]) -> int:
    """i: first token of an item/statement/field after its attributes; returns the index after it."""
    j = i
    if j < end and toks[j].kind == "life" and j + 1 < end and toks[j + 1].v == ":":
        j += 2
    while j < end:
        t = toks[j]
        if t.v == "pub" and j + 1 < end and toks[j + 1].v == "(":
            j = match.get(j + 1, j + 1) + 1
        elif t.v in QUALIFIERS and t.kind == "id":
            j += 1
        elif t.kind == "str":  # extern "C"
            j += 1
        elif t.v == "const" and j + 1 < end and toks[j + 1].v in ("fn", "unsafe", "async", "extern"):
            j += 1
        else:
            break
    if j >= end:
        return end
    head = toks[j].v
    if toks[j].kind == "id" and j + 1 < end and toks[j + 1].v == "!":
        mode = "brace" if (j + 2 < end and toks[j + 2].v == "{") else "semi"
        if head == "macro_rules":
            mode = "brace"
    elif head in BRACE_HEADS:
        mode = "brace"
    elif head in ("use", "let", "type", "static", "const"):
        mode = "semi"
    elif toks[j].kind == "id" and j + 1 < end and toks[j + 1].v == ":":
        mode = "field"
    else:
        mode = "expr"
    k = j
    angle = 0
    while k < end:
        t = toks[k]
        if t.kind == "p":
            if t.v in OPENERS:
                close = match.get(k)
                if close is None:
                    return end
                k = close + 1
                if t.v == "{" and mode == "brace":
                    if head == "if" and k < end and toks[k].v == "else":
                        k += 1
                        continue
                    return k
                continue
            if t.v in CLOSERS:
                return k
            if t.v == ";":
                return k + 1
            if t.v == "," and mode in ("expr", "field") and angle == 0:
                return k + 1
            if mode == "field":
                if t.v == "<":
                    angle += 1
                elif t.v == ">" and angle:
                    angle -= 1
        k += 1
    return end


class CrateTree:
    def __init__(self, label: str, root_file: str, warnings: list[str]):
        self.label = label
        self.warnings = warnings
        self.modules: list[Module] = []
        root = Module((), root_file, os.path.dirname(root_file), None)
        self.root = root
        self._load_file(root)

    def _load_file(self, mod: Module) -> None:
        try:
            with open(mod.file, encoding="utf-8") as f:
                src = f.read()
        except OSError as e:
            self.warnings.append(f"{self.label}: cannot read {rel(mod.file)}: {e}")
            return
        toks = lex(src)
        match = bracket_matches(toks)
        self._scan(mod, toks, 0, len(toks), match)
        if not mod.is_test:
            self.modules.append(mod)
            self._resolve_children(mod)

    def _scan(self, mod: Module, toks: list[Tok], start: int, end: int, match: dict[int, int]) -> None:
        """Collects mod's own non-test tokens from toks[start:end]; declares its children."""
        kept: list[Tok] = []
        pending = mod.decls
        i = start
        path_attr: str | None = None
        while i < end:
            t = toks[i]
            # Attributes: #[..] (outer) and #![..] (inner)
            if t.v == "#" and t.kind == "p":
                inner = i + 1 < end and toks[i + 1].v == "!"
                o = i + 2 if inner else i + 1
                if o < end and toks[o].v == "[" and o in match:
                    c = match[o]
                    if attr_is_test(toks, o + 1, c):
                        if inner:
                            mod.is_test = True
                            return
                        # skip any further attributes, then the item they annotate
                        k = c + 1
                        while k < end and toks[k].v == "#" and k + 1 < end and toks[k + 1].v == "[" \
                                and (k + 1) in match:
                            k = match[k + 1] + 1
                        i = skip_item(toks, k, end, match)
                        path_attr = None
                        continue
                    if toks[o + 1].v == "path" and o + 3 < c and toks[o + 2].v == "=" and toks[o + 3].kind == "str":
                        path_attr = toks[o + 3].v
                    kept.extend(toks[i:c + 1])
                    i = c + 1
                    continue
            if t.kind == "id" and t.v == "pub" and i + 1 < end and toks[i + 1].v == "(" and (i + 1) in match:
                # pub(crate) / pub(in crate::x): visibility, not a reference
                kept.append(t)
                i = match[i + 1] + 1
                continue
            if t.kind == "id" and t.v == "mod" and i + 1 < end and toks[i + 1].kind == "id":
                name = toks[i + 1].v
                nxt = toks[i + 2].v if i + 2 < end else ";"
                if nxt == ";":
                    if name != "tests":
                        pending.append((name, t.line, path_attr))
                    i += 3
                    path_attr = None
                    continue
                if nxt == "{" and (i + 2) in match:
                    close = match[i + 2]
                    if name != "tests":
                        child = Module(mod.path + (name,), mod.file, os.path.join(mod.child_dir, name), mod,
                                       inline=True)
                        self._scan(child, toks, i + 3, close, match)
                        if not child.is_test:
                            mod.children[name] = child
                            self.modules.append(child)
                            self._resolve_children(child)
                    i = close + 1
                    path_attr = None
                    continue
            kept.append(t)
            if t.kind == "p" and t.v in (";", "}"):
                path_attr = None
            i += 1
        mod.toks = kept

    def _resolve_children(self, mod: Module) -> None:
        for name, line, path_attr in mod.decls:
            if path_attr is not None:
                base = mod.child_dir if mod.inline else os.path.dirname(mod.file)
                candidates = [os.path.normpath(os.path.join(base, path_attr))]
            else:
                candidates = [os.path.join(mod.child_dir, name + ".rs"), os.path.join(mod.child_dir, name, "mod.rs")]
            found = next((c for c in candidates if os.path.isfile(c)), None)
            if found is None:
                self.warnings.append(f"{self.label}: {rel(mod.file)}:{line}: no file for `mod {name};` "
                                     f"(looked for {', '.join(rel(c) for c in candidates)})")
                continue
            if os.path.basename(found) == "mod.rs" or path_attr is not None:
                child_dir = os.path.dirname(found)
                if path_attr is not None and os.path.basename(found) != "mod.rs":
                    child_dir = os.path.splitext(found)[0]
            else:
                child_dir = os.path.splitext(found)[0]
            child = Module(mod.path + (name,), found, child_dir, mod)
            self._load_file(child)
            if not child.is_test:
                mod.children[name] = child


def rel(p: str) -> str:
    return os.path.relpath(p, ROOT)


# --------------------------------------------------------------------------
# Reading a module's tokens: use trees, definitions, paths, identifiers
# --------------------------------------------------------------------------

DEF_KEYWORDS = {"fn", "struct", "enum", "trait", "type", "const", "static", "union"}
NOT_A_USE_AFTER = DEF_KEYWORDS | {"mod", "let", "mut", "ref", "macro_rules", "impl", "for", "as"}
PATH_START_KW = {"crate", "self", "super"}


def parse_use_tree(toks: list[Tok], k: int, end: int, prefix: list[str], public: bool,
                   out: list[UseLeaf]) -> int:
    """Parses one use tree at k (with `prefix` already walked); returns the index after it."""
    segs = list(prefix)
    if k < end and toks[k].v == "::":  # leading `::`: an external crate
        segs = segs or ["::"]
        k += 1
    while k < end:
        t = toks[k]
        if t.v == "{":
            k += 1
            while k < end and toks[k].v != "}":
                k = parse_use_tree(toks, k, end, segs, public, out)
                if k < end and toks[k].v == ",":
                    k += 1
            return k + 1
        if t.v == "*":
            out.append(UseLeaf(segs, None, True, public, t.line))
            return k + 1
        if t.kind == "id":
            name = t.v
            k += 1
            if k < end and toks[k].v == "::":
                segs = segs + [name]
                k += 1
                continue
            binding = name
            if name == "self":
                binding = segs[-1] if segs else None
                full = segs
            else:
                full = segs + [name]
            if k + 1 < end and toks[k].v == "as":
                binding = toks[k + 1].v
                k += 2
            if binding is not None and full:
                out.append(UseLeaf(full, binding, False, public, t.line))
            return k
        # `$crate` and the like inside macros
        if t.v == "$" and k + 1 < end and toks[k + 1].v == "crate":
            k += 1
            continue
        return k + 1
    return k


def analyse(mod: Module) -> None:
    toks = mod.toks
    n = len(toks)
    depth = 0
    k = 0
    while k < n:
        t = toks[k]
        if t.kind == "p":
            if t.v == "{":
                depth += 1
            elif t.v == "}":
                depth -= 1
            k += 1
            continue
        if t.kind != "id":
            k += 1
            continue
        prev = toks[k - 1] if k else None
        if t.v == "use" and (prev is None or prev.v != "::"):
            public = prev is not None and prev.v == "pub"
            # the tree ends at the `;`
            e = k + 1
            while e < n and toks[e].v != ";":
                e += 1
            leaves: list[UseLeaf] = []
            parse_use_tree(toks, k + 1, e, [], public, leaves)
            for leaf in leaves:
                mod.uses.append(leaf)
                if leaf.glob:
                    mod.globs.append(leaf)
                else:
                    mod.bindings.setdefault(leaf.binding, []).append(leaf)
            k = e + 1
            continue
        if depth == 0 and t.v in DEF_KEYWORDS and k + 1 < n and toks[k + 1].kind == "id" \
                and (prev is None or prev.v != "::"):
            name = toks[k + 1].v
            if not (t.v == "const" and name in ("fn", "unsafe", "async", "extern", "_")) and name != "fn":
                mod.defined.add(name)
        if depth == 0 and t.v == "macro_rules" and k + 2 < n and toks[k + 1].v == "!" and toks[k + 2].kind == "id":
            mod.defined.add(toks[k + 2].v)
        # paths
        after_dollar = prev is not None and prev.v == "$" and t.v == "crate"
        if (prev is None or prev.v not in ("::", ".") or after_dollar) and k + 2 < n and toks[k + 1].v == "::" \
                and toks[k + 2].kind == "id":
            segs = [t.v]
            j = k + 1
            while j + 1 < n and toks[j].v == "::" and toks[j + 1].kind == "id":
                segs.append(toks[j + 1].v)
                j += 2
            mod.paths.append((segs, t.line))
        # identifiers in code (for re-exported names and globs)
        nxt = toks[k + 1] if k + 1 < n else None
        if (prev is None or (prev.v not in ("::", ".") and prev.v not in NOT_A_USE_AFTER)) \
                and not (nxt is not None and nxt.v == ":"):
            mod.idents.setdefault(t.v, t.line)
        k += 1


# --------------------------------------------------------------------------
# Name resolution
# --------------------------------------------------------------------------


class Resolver:
    """Resolves names and paths to ('mod', M) or ('item', M, name); None when outside the crate."""

    def __init__(self, root: Module):
        self.root = root
        self._leaf_cache: dict[int, object] = {}
        self._active: set[int] = set()

    def scope_first(self, mod: Module, name: str):
        if name == "crate":
            return ("mod", self.root)
        if name == "self":
            return ("mod", mod)
        if name == "super":
            return ("mod", mod.parent) if mod.parent else None
        if name == "Self":
            return None
        return self.member(mod, name, local=True)

    def member(self, mod: Module, name: str, local: bool = False):
        """`name` looked up inside `mod` (as `mod::name`, or unqualified within mod when local)."""
        if name == "super":
            return ("mod", mod.parent) if mod.parent else None
        if name == "self":
            return ("mod", mod)
        if name in mod.children:
            return ("mod", mod.children[name])
        if name in mod.defined:
            return ("item", mod, name)
        for leaf in mod.bindings.get(name, []):
            target = self.leaf_target(mod, leaf)
            if target is not None:
                return target
        for leaf in mod.globs:
            target = self.leaf_target(mod, leaf)
            if target and target[0] == "mod" and target[1] is not mod:
                key = (id(target[1]), name)
                if key in self._active:
                    continue
                self._active.add(key)
                try:
                    found = self.member(target[1], name)
                finally:
                    self._active.discard(key)
                if found is not None and not (found[0] == "item" and name not in found[1].defined
                                              and found[1] is target[1]):
                    return found
        if local:
            return None  # an external crate, a prelude name, a local or generic
        return ("item", mod, name)  # deepest existing module: the item lives here

    def walk(self, mod: Module, segs: list[str]):
        if not segs:
            return None
        if segs[0] == "::":
            return None
        cur = self.scope_first(mod, segs[0])
        for s in segs[1:]:
            if cur is None or cur[0] != "mod":
                break
            cur = self.member(cur[1], s)
        return cur

    def leaf_target(self, mod: Module, leaf: UseLeaf):
        key = id(leaf)
        if key in self._leaf_cache:
            return self._leaf_cache[key]
        if key in self._active:
            return None
        self._active.add(key)
        try:
            target = self.walk(mod, leaf.segs)
        finally:
            self._active.discard(key)
        self._leaf_cache[key] = target
        return target


# --------------------------------------------------------------------------
# Graph and cycles
# --------------------------------------------------------------------------


@dataclass
class Ref:
    file: str
    line: int
    text: str


def siblings(a: Module, b: Module) -> tuple[Module, Module] | None:
    """The edge a -> b as seen between the two subtrees holding them: each
    end lifted to its ancestor just below their lowest common ancestor. None
    when one holds the other: a module and its submodules are one unit (a
    child using its parent's private items, the parent calling into the
    child, is how a module is split into files, not a circle)."""
    chain_a = [a.path[:i] for i in range(len(a.path) + 1)]
    chain_b = [b.path[:i] for i in range(len(b.path) + 1)]
    if a.path in chain_b or b.path in chain_a:
        return None
    common = 0
    while common < min(len(a.path), len(b.path)) and a.path[common] == b.path[common]:
        common += 1
    lift_a, lift_b = a, b
    while len(lift_a.path) > common + 1:
        lift_a = lift_a.parent
    while len(lift_b.path) > common + 1:
        lift_b = lift_b.parent
    return lift_a, lift_b


def build_edges(tree: CrateTree) -> dict[tuple[Module, Module], list[Ref]]:
    res = Resolver(tree.root)
    edges: dict[tuple[Module, Module], list[Ref]] = {}

    def add(a: Module, target, line: int, text: str) -> None:
        if target is None:
            return
        lifted = siblings(a, target[1])
        if lifted is None:
            return
        edges.setdefault(lifted, []).append(Ref(rel(a.file), line, text))

    for mod in tree.modules:
        for leaf in mod.uses:
            if leaf.glob:
                target = res.leaf_target(mod, leaf)
                if target is None or target[0] != "mod" or target[1] is mod:
                    continue
                src = target[1]
                names = set(src.defined) | set(src.children) | set(src.bindings)
                used = sorted((mod.idents[nm], nm) for nm in names if nm in mod.idents)
                if used:
                    line, nm = used[0]
                    add(mod, res.member(src, nm), line, f"{nm} (via `use {'::'.join(leaf.segs)}::*` "
                                                        f"at line {leaf.line})")
                continue
            target = res.leaf_target(mod, leaf)
            if target is None or target[0] == "mod":
                continue  # a module import: the paths through it count
            text = "::".join(leaf.segs)
            if not leaf.public:
                add(mod, target, leaf.line, f"use {text}")
            elif leaf.binding in mod.idents:
                add(mod, target, mod.idents[leaf.binding],
                    f"{leaf.binding} (re-exported by `pub use {text}` at line {leaf.line}, used here)")
        for segs, line in mod.paths:
            target = res.walk(mod, segs)
            add(mod, target, line, "::".join(segs))
    for refs in edges.values():
        refs.sort(key=lambda r: (r.file, r.line))
    return edges


def sccs(nodes: list[Module], succ: dict[Module, list[Module]]) -> list[list[Module]]:
    index: dict[Module, int] = {}
    low: dict[Module, int] = {}
    on: set[Module] = set()
    stack: list[Module] = []
    out: list[list[Module]] = []
    counter = 0
    for start in nodes:
        if start in index:
            continue
        work = [(start, iter(succ.get(start, [])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on.add(start)
        while work:
            v, it = work[-1]
            advanced = False
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(succ.get(w, []))))
                    advanced = True
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w is v:
                        break
                out.append(comp)
    return out


def shortest_path(src: Module, dst: Module, succ: dict[Module, list[Module]], allowed: set[Module]):
    prev: dict[Module, Module | None] = {src: None}
    q = deque([src])
    while q:
        v = q.popleft()
        if v is dst:
            path = []
            while v is not None:
                path.append(v)
                v = prev[v]
            return path[::-1]
        for w in succ.get(v, []):
            if w in allowed and w not in prev:
                prev[w] = v
                q.append(w)
    return None


def cycles_of(comp: list[Module], succ: dict[Module, list[Module]]) -> list[list[Module]]:
    """Shortest circles through the component's edges: every edge appears in at least one."""
    members = set(comp)
    seen: set[tuple[str, ...]] = set()
    found: list[list[Module]] = []
    order = sorted(comp, key=lambda m: m.name)
    for a in order:
        for b in sorted(succ.get(a, []), key=lambda m: m.name):
            if b not in members:
                continue
            back = shortest_path(b, a, succ, members)
            if back is None:
                continue
            cyc = [a] + back  # a -> b -> ... -> a
            ring = [m.name for m in cyc[:-1]]
            r = ring.index(min(ring))
            key = tuple(ring[r:] + ring[:r])
            if key in seen:
                continue
            seen.add(key)
            found.append(cyc[:-1][r:] + cyc[:-1][:r] + [cyc[:-1][r]])
    found.sort(key=lambda c: (len(c), [m.name for m in c]))
    # Keep a circle only if it shows an edge no shorter circle already showed.
    covered: set[tuple[str, str]] = set()
    kept: list[list[Module]] = []
    for cyc in found:
        pairs = {(a.name, b.name) for a, b in zip(cyc, cyc[1:])}
        if pairs - covered:
            covered |= pairs
            kept.append(cyc)
    return kept


# --------------------------------------------------------------------------
# Workspace
# --------------------------------------------------------------------------


def crate_roots(member_dir: str) -> list[tuple[str, str]]:
    """[(label, root file)] for a member's library and binaries."""
    with open(os.path.join(member_dir, "Cargo.toml"), "rb") as f:
        manifest = tomllib.load(f)
    name = manifest.get("package", {}).get("name", os.path.basename(member_dir))
    roots: list[tuple[str, str]] = []
    lib = manifest.get("lib", {}).get("path", "src/lib.rs")
    if os.path.isfile(os.path.join(member_dir, lib)):
        roots.append((name, os.path.join(member_dir, lib)))
    bins = manifest.get("bin", [])
    seen = {os.path.normpath(p) for _, p in roots}
    default_main = os.path.join(member_dir, "src", "main.rs")
    bin_paths = [(b.get("name", name), os.path.join(member_dir, b["path"])) for b in bins if "path" in b]
    if os.path.isfile(default_main) and not bin_paths:
        bin_paths.append((name, default_main))
    for bname, p in bin_paths:
        if os.path.isfile(p) and os.path.normpath(p) not in seen:
            roots.append((f"{bname} (bin)", p))
            seen.add(os.path.normpath(p))
    return roots


def workspace_members() -> list[str]:
    with open(os.path.join(ROOT, "Cargo.toml"), "rb") as f:
        ws = tomllib.load(f).get("workspace", {})
    members: list[str] = []
    excluded = {os.path.normpath(os.path.join(ROOT, e)) for e in ws.get("exclude", [])}
    for pattern in ws.get("members", []):
        for d in sorted(glob.glob(os.path.join(ROOT, pattern))):
            d = os.path.normpath(d)
            if d not in excluded and os.path.isfile(os.path.join(d, "Cargo.toml")) and d not in members:
                members.append(d)
    return members


def main() -> int:
    ap = argparse.ArgumentParser(description="Report import circles between the modules of each workspace crate.")
    ap.add_argument("--edges", action="store_true", help="also list every module-to-module edge found")
    ap.add_argument("--crate", action="append", default=[], metavar="NAME",
                    help="only this crate (package name or member path); repeatable")
    args = ap.parse_args()

    if not os.path.isfile(os.path.join(ROOT, "Cargo.toml")):
        print(f"module-cycles: no Cargo.toml at {ROOT}", file=sys.stderr)
        return 2
    members = workspace_members()
    if not members:
        print("module-cycles: no workspace members found", file=sys.stderr)
        return 2

    warnings: list[str] = []
    n_crates = n_roots = n_modules = n_cycles = n_comps = 0
    for member in members:
        roots = crate_roots(member)
        if args.crate and not any(c in (rel(member),) or any(c == lbl.split(" ")[0] for lbl, _ in roots)
                                  for c in args.crate):
            continue
        if not roots:
            warnings.append(f"{rel(member)}: no src/lib.rs or src/main.rs")
            continue
        n_crates += 1
        for label, root_file in roots:
            n_roots += 1
            tree = CrateTree(label, root_file, warnings)
            for mod in tree.modules:
                analyse(mod)
            n_modules += len(tree.modules)
            edges = build_edges(tree)
            succ: dict[Module, list[Module]] = {}
            for a, b in edges:
                succ.setdefault(a, []).append(b)
            if args.edges:
                for (a, b), refs in sorted(edges.items(), key=lambda e: (e[0][0].name, e[0][1].name)):
                    r = refs[0]
                    more = f"  (+{len(refs) - 1} more)" if len(refs) > 1 else ""
                    print(f"edge {label}: {a.name} -> {b.name}  {r.file}:{r.line}  {r.text}{more}")
            comps = [c for c in sccs(tree.modules, succ) if len(c) > 1]
            comps.sort(key=lambda c: min(m.name for m in c))
            for comp in comps:
                n_comps += 1
                if len(comp) > 2:
                    names = ", ".join(sorted(m.name for m in comp))
                    print(f"{label}: {len(comp)} modules in one circle group: {names}")
                for cyc in cycles_of(comp, succ):
                    n_cycles += 1
                    print(f"{label}: " + " -> ".join(m.name for m in cyc))
                    for a, b in zip(cyc, cyc[1:]):
                        refs = edges[(a, b)]
                        r = refs[0]
                        more = f"  (+{len(refs) - 1} more)" if len(refs) > 1 else ""
                        print(f"    {a.name} -> {b.name}: {r.file}:{r.line}  {r.text}{more}")
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    summary = (f"module-cycles: {n_crates} crates ({n_roots} crate roots), {n_modules} modules checked: ")
    if n_cycles:
        print(summary + f"{n_cycles} circles in {n_comps} groups of mutually dependent modules")
        return 1
    print(summary + "no circles")
    return 0


if __name__ == "__main__":
    sys.exit(main())
