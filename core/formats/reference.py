"""Image references: ``[domain/]path[:tag][@digest]``, normalized the way the docker CLI does it.

Grammar (all ASCII)::

    reference   := name [ ":" tag ] [ "@" digest ]
    name        := [ domain "/" ] component ( "/" component )*
    domain      := host [ ":" port ]
    host        := label ( "." label )* | "[" ipv6 "]"
    label       := [a-zA-Z0-9] | [a-zA-Z0-9] [a-zA-Z0-9-]* [a-zA-Z0-9]
    port        := [0-9]+
    component   := [a-z0-9]+ ( ( "." | "_" | "__" | "-"+ ) [a-z0-9]+ )*
    tag         := [A-Za-z0-9_] [A-Za-z0-9_.-]{0,127}
    digest      := sha256:<64 hex> | sha512:<128 hex>

Normalization (:func:`parse_normalized`):

* The first ``/``-separated part of the name is a registry domain only if it contains ``.`` or ``:`` or is
  exactly ``localhost``. Anything else belongs to the repository path on ``docker.io``; the repository path
  must be lowercase.
* ``index.docker.io`` is spelled ``docker.io``; a one-component path on ``docker.io`` gets ``library/``.
* The whole name (``domain/path``) is at most 255 characters.
* A bare 64-character lowercase hex string is refused: it is an image ID, not a repository name.

The *familiar* form is what users type: ``busybox:latest`` rather than ``docker.io/library/busybox:latest``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from enum import Enum
from typing import NamedTuple

from lamina.digest import parse_digest
from lamina.errors import DigestError, InvalidReference

DEFAULT_DOMAIN = "docker.io"
LEGACY_DEFAULT_DOMAIN = "index.docker.io"
OFFICIAL_REPO_PREFIX = "library/"
DEFAULT_TAG = "latest"
NAME_TOTAL_LENGTH_MAX = 255
TAG_LENGTH_MAX = 128

# Longest string that could possibly be valid: name, ":" tag, "@sha512:" 128 hex.
_INPUT_LENGTH_MAX = NAME_TOTAL_LENGTH_MAX + 1 + TAG_LENGTH_MAX + 1 + len("sha512:") + 128

# "-+" accepts the same language as "-*" between two alphanumeric runs, without the backtracking blow-up.
_COMPONENT_RE = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*", re.ASCII)
_LABEL = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN_RE = re.compile(rf"(?:{_LABEL}(?:\.{_LABEL})*|\[[a-fA-F0-9:]+\])(?::[0-9]+)?", re.ASCII)
_TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}", re.ASCII)
_IDENTIFIER_RE = re.compile(r"[a-f0-9]{64}", re.ASCII)
_ID_PREFIX_RE = re.compile(r"(?:sha256:)?[a-f0-9]{3,64}", re.ASCII)


def _show(value: str) -> str:
    """The input as quoted in an error message: truncated, with control characters escaped."""
    return repr(value if len(value) <= 80 else value[:77] + "...")


def _is_domain(first: str) -> bool:
    """Whether the first part of a name is a registry domain rather than a path component."""
    return "." in first or ":" in first or first == "localhost"


def _tag_problem(tag: str) -> str | None:
    if not tag:
        return "empty tag"
    if len(tag) > TAG_LENGTH_MAX:
        return f"invalid tag {_show(tag)}: longer than {TAG_LENGTH_MAX} characters"
    if _TAG_RE.fullmatch(tag) is None:
        return f"invalid tag {_show(tag)}: a tag is [A-Za-z0-9_] followed by up to 127 of [A-Za-z0-9_.-]"
    return None


def _digest_problem(digest: str) -> str | None:
    try:
        parse_digest(digest)
    except DigestError:
        return f"invalid digest {_show(digest)}: expected sha256:<64 hex> or sha512:<128 hex>"
    return None


def _name_problem(domain: str, path: str) -> str | None:
    if not domain:
        return "empty registry domain"
    if _DOMAIN_RE.fullmatch(domain) is None:
        return f"invalid registry domain {_show(domain)}"
    if not _is_domain(domain):
        return f"registry domain {_show(domain)} must contain '.' or ':' or be 'localhost'"
    if not path:
        return "missing repository name"
    if path != path.lower():
        return "repository name must be lowercase"
    for component in path.split("/"):
        if not component:
            return "repository name has an empty path component"
        if _COMPONENT_RE.fullmatch(component) is None:
            return (
                f"invalid repository name component {_show(component)}: components are lowercase letters and "
                "digits, separated by '.', '_', '__' or dashes"
            )
    if len(domain) + 1 + len(path) > NAME_TOTAL_LENGTH_MAX:
        return f"repository name is longer than {NAME_TOTAL_LENGTH_MAX} characters"
    return None


def _familiar_name(domain: str, path: str) -> str:
    """:meth:`Reference.familiar_name` of the normalized name ``domain/path``."""
    if domain != DEFAULT_DOMAIN:
        return f"{domain}/{path}"
    if _is_domain(path.split("/", 1)[0]):
        return f"{domain}/{path}"
    if path.startswith(OFFICIAL_REPO_PREFIX):
        short = path[len(OFFICIAL_REPO_PREFIX) :]
        if "/" not in short and _IDENTIFIER_RE.fullmatch(short) is None:
            return short
    return path


def familiar_stored(name: str) -> str:
    """``parse_normalized(name).familiar()`` for a name as the image store records it (``str()`` of a
    :class:`Reference`, already valid and normalized), without validating it again: listings call this once
    per name. A name that does not start with a domain is parsed in full."""
    rest, at, digest = name.partition("@")
    colon = rest.rfind(":")
    if colon > rest.rfind("/"):
        rest, suffix = rest[:colon], rest[colon:]
    else:
        suffix = ""
    domain, slash, path = rest.partition("/")
    if not slash or not path or not _is_domain(domain) or domain == LEGACY_DEFAULT_DOMAIN:
        return parse_normalized(name).familiar()
    return _familiar_name(domain, path) + suffix + (at + digest if at else "")


def _normalize_name(domain: str, path: str) -> tuple[str, str]:
    if domain == LEGACY_DEFAULT_DOMAIN:
        domain = DEFAULT_DOMAIN
    if domain == DEFAULT_DOMAIN and path and "/" not in path:
        path = OFFICIAL_REPO_PREFIX + path
    return domain, path


@dataclass(frozen=True)
class Reference:
    """A normalized image reference. Construction validates every field and normalizes ``docker.io`` names.

    Every instance satisfies ``parse_normalized(str(ref)) == ref`` and ``parse_normalized(ref.familiar()) == ref``.
    """

    domain: str
    path: str
    tag: str | None = None
    digest: str | None = None

    def __post_init__(self) -> None:
        for field_name in ("domain", "path"):
            if not isinstance(getattr(self, field_name), str):
                raise InvalidReference(f"reference {field_name} must be a string")
        for field_name in ("tag", "digest"):
            value = getattr(self, field_name)
            if value is not None and not isinstance(value, str):
                raise InvalidReference(f"reference {field_name} must be a string or None")
        domain, path = _normalize_name(self.domain, self.path)
        object.__setattr__(self, "domain", domain)
        object.__setattr__(self, "path", path)
        problem = _name_problem(domain, path)
        if problem is None and self.tag is not None:
            problem = _tag_problem(self.tag)
        if problem is None and self.digest is not None:
            problem = _digest_problem(self.digest)
        if problem is not None:
            raise InvalidReference(f"invalid reference {_show(self._render(domain + '/' + path))}: {problem}")

    def _render(self, name: str) -> str:
        out = name
        if self.tag is not None:
            out += ":" + self.tag
        if self.digest is not None:
            out += "@" + self.digest
        return out

    @property
    def name(self) -> str:
        """``domain/path``, e.g. ``docker.io/library/busybox``."""
        return f"{self.domain}/{self.path}"

    def __str__(self) -> str:
        return self._render(self.name)

    def familiar_name(self) -> str:
        """The name as users write it: ``busybox`` for ``docker.io/library/busybox``, ``user/app`` for
        ``docker.io/user/app``. The ``docker.io/`` or ``library/`` prefix stays whenever dropping it would make
        the short form parse differently (a first path component that looks like a domain, or a 64-hex name)."""
        return _familiar_name(self.domain, self.path)

    def familiar(self) -> str:
        """The familiar name with the tag and digest, e.g. ``busybox:latest``."""
        return self._render(self.familiar_name())

    def with_default_tag(self) -> Reference:
        """Add the ``latest`` tag when the reference has neither a tag nor a digest."""
        if self.tag is None and self.digest is None:
            return replace(self, tag=DEFAULT_TAG)
        return self

    def with_tag(self, tag: str) -> Reference:
        """The same name (and digest, if any) with ``tag``."""
        return replace(self, tag=parse_tag(tag))

    def with_digest(self, digest: str) -> Reference:
        """The same name (and tag, if any) with ``digest``."""
        if not isinstance(digest, str):
            raise InvalidReference("digest must be a string")
        problem = _digest_problem(digest)
        if problem is not None:
            raise InvalidReference(problem)
        return replace(self, digest=digest)

    def name_only(self) -> Reference:
        """The reference without tag and digest."""
        return replace(self, tag=None, digest=None)


def parse_tag(tag: str) -> str:
    """Validate a bare tag (``[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}``) and return it."""
    if not isinstance(tag, str):
        raise InvalidReference(f"tag must be a string, got {type(tag).__name__}")
    problem = _tag_problem(tag)
    if problem is not None:
        raise InvalidReference(problem if tag else "invalid tag '': a tag cannot be empty")
    return tag


def parse_normalized(s: str) -> Reference:
    """Parse a reference as the docker CLI does, filling in ``docker.io`` and ``library/``.

    Raise :class:`InvalidReference` for anything that breaks the grammar.
    """
    if not isinstance(s, str):
        raise InvalidReference(f"reference must be a string, got {type(s).__name__}")
    shown = _show(s)
    if not s:
        raise InvalidReference("invalid reference '': empty reference")
    if len(s) > _INPUT_LENGTH_MAX:
        raise InvalidReference(f"invalid reference {shown}: too long")
    if any(c.isspace() or not c.isprintable() or not c.isascii() for c in s):
        raise InvalidReference(f"invalid reference {shown}: contains whitespace, control or non-ASCII characters")
    if _IDENTIFIER_RE.fullmatch(s) is not None:
        raise InvalidReference(
            f"invalid repository name {shown}: cannot specify 64-byte hexadecimal strings (that is an image ID)"
        )

    rest, at, digest = s.partition("@")
    if at:
        problem = _digest_problem(digest)
        if problem is not None:
            raise InvalidReference(f"invalid reference {shown}: {problem}")
    tag: str | None = None
    colon = rest.rfind(":")
    if colon > rest.rfind("/"):
        rest, tag = rest[:colon], rest[colon + 1 :]
        problem = _tag_problem(tag)
        if problem is not None:
            raise InvalidReference(f"invalid reference {shown}: {problem}")
    if not rest:
        raise InvalidReference(f"invalid reference {shown}: missing repository name")

    first, slash, remainder = rest.partition("/")
    if slash and _is_domain(first):
        domain, path = first, remainder
    else:
        domain, path = DEFAULT_DOMAIN, rest
    domain, path = _normalize_name(domain, path)
    problem = _name_problem(domain, path)
    if problem is not None:
        raise InvalidReference(f"invalid reference {shown}: {problem}")
    return Reference(domain, path, tag, digest if at else None)


def looks_like_id_prefix(s: str) -> bool:
    """Whether ``s`` could be a (possibly truncated) image ID: 3 to 64 lowercase hex, optionally ``sha256:``."""
    return isinstance(s, str) and _ID_PREFIX_RE.fullmatch(s) is not None


# --- reference filters -----------------------------------------------------------------------------------------


class _Class(NamedTuple):
    negated: bool
    ranges: tuple[tuple[str, str], ...]


class _Wild(Enum):
    STAR = "*"
    ANY = "?"


# A compiled glob token: a literal character, a wildcard or a character class.
_Token = str | _Class | _Wild
_STAR = _Wild.STAR
_ANY = _Wild.ANY


def _compile_glob(pattern: str) -> list[_Token]:
    """Tokenize a path.Match-style pattern; raise :class:`InvalidReference` when it is malformed.

    ``*`` is any run of characters other than ``/``, ``?`` one character other than ``/``, ``[...]`` a class
    (``^`` negates, ``a-z`` ranges, ``\\`` escapes), ``\\c`` the literal ``c``.
    """
    bad = f"invalid reference filter {_show(pattern)}: malformed pattern"
    tokens: list[_Token] = []
    i, n = 0, len(pattern)

    def escaped_char(j: int) -> tuple[str, int]:
        # One possibly escaped class character at j; returns it and the next index.
        if j >= n or pattern[j] in "-]":
            raise InvalidReference(bad)
        if pattern[j] == "\\":
            j += 1
            if j >= n:
                raise InvalidReference(bad)
        return pattern[j], j + 1

    while i < n:
        c = pattern[i]
        if c == "*":
            tokens.append(_STAR)
            i += 1
        elif c == "?":
            tokens.append(_ANY)
            i += 1
        elif c == "\\":
            if i + 1 >= n:
                raise InvalidReference(bad)
            tokens.append(pattern[i + 1])
            i += 2
        elif c == "[":
            i += 1
            negated = i < n and pattern[i] == "^"
            if negated:
                i += 1
            ranges: list[tuple[str, str]] = []
            while True:
                if i < n and pattern[i] == "]" and ranges:
                    i += 1
                    break
                lo, i = escaped_char(i)
                hi = lo
                if i < n and pattern[i] == "-":
                    hi, i = escaped_char(i + 1)
                ranges.append((lo, hi))
            tokens.append(_Class(negated, tuple(ranges)))
        else:
            tokens.append(c)
            i += 1
    return tokens


def _token_matches(token: _Token, ch: str) -> bool:
    if token is _ANY:
        return ch != "/"
    if isinstance(token, _Class):
        inside = any(lo <= ch <= hi for lo, hi in token.ranges)
        return inside != token.negated
    return token == ch


def _glob_match(tokens: list[_Token], text: str) -> bool:
    """Simulate the pattern as an automaton over token positions: linear in len(tokens) * len(text)."""
    end = len(tokens)

    def closure(states: set[int]) -> set[int]:
        out = set(states)
        for i in sorted(states):
            while i < end and tokens[i] is _STAR:
                i += 1
                out.add(i)
        return out

    states = closure({0})
    for ch in text:
        nxt: set[int] = set()
        for i in states:
            if i == end:
                continue
            token = tokens[i]
            if token is _STAR:
                if ch != "/":
                    nxt.add(i)
            elif _token_matches(token, ch):
                nxt.add(i + 1)
        if not nxt:
            return False
        states = closure(nxt)
    return end in states


def familiar_match(pattern: str, ref: Reference) -> bool:
    """Docker's ``reference=`` image filter.

    ``pattern`` is a shell glob in which ``*`` and ``?`` do not cross ``/``. It is tried against the familiar
    and the full form of ``ref`` (with tag and digest), then against the familiar and the full name alone, so
    ``busybox``, ``busy*``, ``busybox:*`` and ``docker.io/library/busybox:*`` all match ``busybox:latest``.
    A malformed pattern raises :class:`InvalidReference`.
    """
    if not isinstance(pattern, str):
        raise InvalidReference(f"reference filter must be a string, got {type(pattern).__name__}")
    tokens = _compile_glob(pattern)
    candidates = (ref.familiar(), str(ref), ref.familiar_name(), ref.name)
    return any(_glob_match(tokens, candidate) for candidate in candidates)


def is_qualified(name: str) -> bool:
    """Whether ``name`` names its registry (its first component is a domain: has ``.`` or ``:``, or is
    ``localhost``)."""
    first, sep, _ = name.partition("/")
    return bool(sep) and _is_domain(first)


def resolve_names(name: str, registries: Sequence[str]) -> list[Reference]:
    """cri-o's ResolveNames for a name to pull: a qualified name is itself; an unqualified one is tried on
    every configured registry in order (``busybox`` on ``docker.io`` is ``docker.io/library/busybox``).

    A 64-hex string is an image ID, never a repository (:class:`InvalidReference`); callers look truncated
    IDs up locally before resolving. No registries and an unqualified name: :class:`InvalidReference`.
    """
    ref = parse_normalized(name)  # rejects 64-hex names and anything malformed
    if is_qualified(name):
        return [ref.with_default_tag() if ref.digest is None else ref]
    if not registries:
        raise InvalidReference(f"{_show(name)} names no registry and none are configured ([images] registries)")
    out = []
    rest = name
    for registry in registries:
        r = parse_normalized(f"{registry}/{rest}")
        out.append(r if r.digest else r.with_default_tag())
    return list(dict.fromkeys(out))
