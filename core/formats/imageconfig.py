"""Dockerfile-style ``--change`` instructions applied to the ``config`` section of an image config.

Supported instructions (the keyword is case-insensitive)::

    CMD ["exe", "arg"]          | CMD shell command line         -> Cmd
    ENTRYPOINT ["exe", "arg"]   | ENTRYPOINT shell command line  -> Entrypoint (and see below)
    ENV K=V K2="v 2"            | ENV K some value               -> Env
    LABEL k=v "k 2"="v 2"       | LABEL k some value             -> Labels
    EXPOSE 80 443/tcp 53/udp 8000-8002                           -> ExposedPorts
    USER user[:group]                                            -> User
    WORKDIR /abs | rel                                           -> WorkingDir
    VOLUME ["/a", "/b"]         | VOLUME /a /b                   -> Volumes
    STOPSIGNAL SIGTERM | TERM | 15 | SIGRTMIN+3                  -> StopSignal

Semantics follow the Dockerfile builder that ``docker commit --change`` runs:

* The JSON (exec) form of CMD, ENTRYPOINT and VOLUME is taken literally. Any argument starting with ``[`` is
  the JSON form and must be a JSON array of strings.
* The shell form of CMD and ENTRYPOINT becomes ``[*shell, "<rest of the line>"]``, the shell being the config's
  ``Shell`` when it has one, else ``["/bin/sh", "-c"]``. The command line is kept verbatim.
* ENTRYPOINT clears Cmd, unless a CMD instruction came earlier in the same list of changes (this is what the
  Dockerfile builder does, and so ``docker commit``). To keep the image's Cmd, pass it again before ENTRYPOINT.
* Arguments of ENV, LABEL, EXPOSE, USER, WORKDIR, VOLUME (shell form) and STOPSIGNAL go through Dockerfile word
  processing: ``'single'`` and ``"double"`` quotes, backslash escapes, and ``$VAR``, ``${VAR}``,
  ``${VAR:-default}``, ``${VAR-default}``, ``${VAR:+alt}`` and ``${VAR+alt}`` against the Env as it stands
  before the instruction (unset variables expand to nothing). Write ``\\$`` or ``'$'`` for a literal dollar.
* ENV replaces a variable of the same name in place and appends new ones; LABEL, EXPOSE and VOLUME add to
  what is there; WORKDIR joins a relative path onto the current WorkingDir (``/`` when unset).
* STOPSIGNAL is validated (Linux names, with or without ``SIG``, any case; ``RTMIN+n``/``RTMAX-n``; 1..64) and
  stored as written.

Everything else (RUN, COPY, ADD, FROM, HEALTHCHECK, ONBUILD, ...) raises :class:`InvalidChange`.
"""

from __future__ import annotations

import copy
import json
import posixpath
import re
from collections.abc import Mapping, Sequence
from typing import Any

from lamina.errors import InvalidChange, InvalidDocument

SUPPORTED = ("CMD", "ENTRYPOINT", "ENV", "EXPOSE", "LABEL", "STOPSIGNAL", "USER", "VOLUME", "WORKDIR")
DEFAULT_SHELL = ("/bin/sh", "-c")
PROTOCOLS = ("tcp", "udp", "sctp")

_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*", re.ASCII)
_PORT_RE = re.compile(r"([0-9]+)(?:-([0-9]+))?(?:/([A-Za-z]+))?", re.ASCII)
_RT_RE = re.compile(r"RT(MIN|MAX)(?:([+-])([0-9]{1,2}))?", re.ASCII)
_MAX_NESTING = 16
_SIGRTMIN, _SIGRTMAX = 34, 64
_SIGNALS = {
    "HUP": 1, "INT": 2, "QUIT": 3, "ILL": 4, "TRAP": 5, "ABRT": 6, "IOT": 6, "BUS": 7, "FPE": 8, "KILL": 9,
    "USR1": 10, "SEGV": 11, "USR2": 12, "PIPE": 13, "ALRM": 14, "TERM": 15, "STKFLT": 16, "CHLD": 17, "CLD": 17,
    "CONT": 18, "STOP": 19, "TSTP": 20, "TTIN": 21, "TTOU": 22, "URG": 23, "XCPU": 24, "XFSZ": 25, "VTALRM": 26,
    "PROF": 27, "WINCH": 28, "IO": 29, "POLL": 29, "PWR": 30, "SYS": 31,
}  # fmt: skip


def _show(value: str) -> str:
    return repr(value if len(value) <= 80 else value[:77] + "...")


class _Fail(Exception):
    """Internal: a problem description, turned into an InvalidChange quoting the whole line."""


# --- Dockerfile word processing ------------------------------------------------------------------------------


def _split_words(text: str) -> list[str]:
    """Split on whitespace outside quotes; quotes and escapes stay in the words for :func:`_process`."""
    words: list[str] = []
    current: list[str] = []
    quote = ""
    in_word = False
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if quote == "" and c.isspace():
            if in_word:
                words.append("".join(current))
                current, in_word = [], False
            i += 1
            continue
        in_word = True
        if c == "\\" and quote != "'" and i + 1 < n:
            current.append(text[i : i + 2])
            i += 2
            continue
        if quote == "" and c in "'\"":
            quote = c
        elif c == quote:
            quote = ""
        current.append(c)
        i += 1
    if in_word:
        words.append("".join(current))
    return words


class _Processor:
    """Quote removal, escapes and variable expansion for one word."""

    def __init__(self, text: str, env: Mapping[str, str]) -> None:
        self.text = text
        self.env = env

    def run(self) -> str:
        out, _ = self._until(0, stop=False, depth=0)
        return out

    def _until(self, i: int, *, stop: bool, depth: int) -> tuple[str, int]:
        # Process from i to the end of the text, or (stop=True) to the closing '}' of a ${...} default.
        if depth > _MAX_NESTING:
            raise _Fail("variable substitutions nested too deeply")
        text, n = self.text, len(self.text)
        parts: list[str] = []
        while i < n:
            c = text[i]
            if stop and c == "}":
                return "".join(parts), i
            if c == "\\":
                if i + 1 < n:
                    parts.append(text[i + 1])
                i += 2
            elif c == "'":
                end = text.find("'", i + 1)
                if end < 0:
                    raise _Fail("unterminated single quote")
                parts.append(text[i + 1 : end])
                i = end + 1
            elif c == '"':
                value, i = self._double_quoted(i + 1, depth)
                parts.append(value)
            elif c == "$":
                value, i = self._dollar(i + 1, depth)
                parts.append(value)
            else:
                parts.append(c)
                i += 1
        if stop:
            raise _Fail("missing '}' in variable substitution")
        return "".join(parts), i

    def _double_quoted(self, i: int, depth: int) -> tuple[str, int]:
        text, n = self.text, len(self.text)
        parts: list[str] = []
        while i < n:
            c = text[i]
            if c == '"':
                return "".join(parts), i + 1
            if c == "\\" and i + 1 < n and text[i + 1] in '"$\\':
                parts.append(text[i + 1])
                i += 2
            elif c == "$":
                value, i = self._dollar(i + 1, depth)
                parts.append(value)
            else:
                parts.append(c)
                i += 1
        raise _Fail("unterminated double quote")

    def _dollar(self, i: int, depth: int) -> tuple[str, int]:
        # i is just past the '$'.
        text, n = self.text, len(self.text)
        if i < n and text[i] == "{":
            m = _NAME_RE.match(text, i + 1)
            if m is None:
                raise _Fail("bad variable substitution: expected a name after '${'")
            name, j = m.group(), m.end()
            value = self.env.get(name)
            if j >= n:
                raise _Fail("missing '}' in variable substitution")
            if text[j] == "}":
                return value or "", j + 1
            for op in (":-", ":+", "-", "+"):
                if text.startswith(op, j):
                    word, end = self._until(j + len(op), stop=True, depth=depth + 1)
                    if op == ":-":
                        result = value if value else word
                    elif op == "-":
                        result = value if value is not None else word
                    elif op == ":+":
                        result = word if value else ""
                    else:
                        result = word if value is not None else ""
                    return result, end + 1
            raise _Fail(f"unsupported variable substitution {_show(text[i - 1 : j + 2] + '...')}")
        m = _NAME_RE.match(text, i)
        if m is None:
            return "$", i
        return self.env.get(m.group(), ""), m.end()


def _process(text: str, env: Mapping[str, str]) -> str:
    return _Processor(text, env).run()


# --- per-instruction parsing ---------------------------------------------------------------------------------


def _json_strings(rest: str) -> list[str]:
    try:
        value = json.loads(rest)
    except (ValueError, RecursionError):
        raise _Fail("malformed JSON array") from None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _Fail("the JSON form must be an array of strings")
    return value


def _key_values(rest: str, env: Mapping[str, str], instruction: str) -> list[tuple[str, str]]:
    words = _split_words(rest)
    if not words:
        raise _Fail("needs at least one name=value pair")
    if "=" not in words[0]:
        # Legacy form: NAME value with spaces
        parts = rest.split(None, 1)
        if len(parts) < 2:
            raise _Fail(f"{_show(parts[0])} needs a value: write name=value or name value")
        return [(_process(parts[0], env), _process(parts[1].strip(), env))]
    pairs: list[tuple[str, str]] = []
    for word in words:
        if "=" not in word:
            raise _Fail(f"missing '=' in {_show(word)}: write name=value")
        key, _, value = word.partition("=")
        pairs.append((_process(key, env), _process(value, env)))
    return pairs


def _env_pairs(rest: str, env: Mapping[str, str]) -> list[tuple[str, str]]:
    pairs = _key_values(rest, env, "ENV")
    for key, _ in pairs:
        if not key:
            raise _Fail("variable names cannot be empty")
        if "=" in key or any(c.isspace() or not c.isprintable() for c in key):
            raise _Fail(f"invalid variable name {_show(key)}")
    return pairs


def _label_pairs(rest: str, env: Mapping[str, str]) -> list[tuple[str, str]]:
    pairs = _key_values(rest, env, "LABEL")
    for key, _ in pairs:
        if not key:
            raise _Fail("label names cannot be empty")
    return pairs


def _port_specs(rest: str, env: Mapping[str, str]) -> list[str]:
    specs: list[str] = []
    for word in _split_words(rest):
        specs.extend(_process(word, env).split())
    if not specs:
        raise _Fail("needs at least one port")
    ports: list[str] = []
    for spec in specs:
        m = _PORT_RE.fullmatch(spec)
        if m is None:
            raise _Fail(f"invalid port {_show(spec)}: expected PORT[-PORT][/PROTOCOL]")
        start = int(m.group(1))
        end = int(m.group(2)) if m.group(2) is not None else start
        proto = (m.group(3) or "tcp").lower()
        if proto not in PROTOCOLS:
            raise _Fail(f"invalid protocol {_show(m.group(3))} in {_show(spec)}: expected tcp, udp or sctp")
        for port in (start, end):
            if not 1 <= port <= 65535:
                raise _Fail(f"port {port} in {_show(spec)} is out of range 1-65535")
        if end < start:
            raise _Fail(f"invalid port range {_show(spec)}: the end is below the start")
        ports.extend(f"{port}/{proto}" for port in range(start, end + 1))
    return ports


def _user(rest: str, env: Mapping[str, str]) -> str:
    user = _process(rest, env)
    if not user:
        raise _Fail("needs a user name or ID")
    if any(c.isspace() or not c.isprintable() for c in user):
        raise _Fail(f"{_show(user)} contains whitespace or control characters")
    if user.count(":") > 1 or "" in user.split(":"):
        raise _Fail(f"{_show(user)} is not of the form user[:group]")
    return user


def _workdir(rest: str, env: Mapping[str, str]) -> str:
    path = _process(rest, env)
    if not path:
        raise _Fail("needs a path")
    if "\0" in path:
        raise _Fail("the path contains a NUL character")
    return path


def _volumes(rest: str, env: Mapping[str, str]) -> list[str]:
    paths = _json_strings(rest) if rest.startswith("[") else [_process(w, env) for w in _split_words(rest)]
    if not paths:
        raise _Fail("needs at least one path")
    for path in paths:
        if not path.startswith("/"):
            raise _Fail(f"path {_show(path)} is not absolute")
        if "\0" in path:
            raise _Fail(f"path {_show(path)} contains a NUL character")
    return paths


def _signal_number(value: str) -> int | None:
    if value.isascii() and value.isdigit():
        return int(value)
    name = value.upper()
    if name.startswith("SIG"):
        name = name[3:]
    if name in _SIGNALS:
        return _SIGNALS[name]
    m = _RT_RE.fullmatch(name)
    if m is None:
        return None
    base = _SIGRTMIN if m.group(1) == "MIN" else _SIGRTMAX
    offset = int(m.group(3)) if m.group(3) is not None else 0
    return base + offset if m.group(2) == "+" else base - offset


def _stop_signal(rest: str, env: Mapping[str, str]) -> str:
    value = _process(rest, env)
    number = _signal_number(value)
    if number is None or not 1 <= number <= _SIGRTMAX or ("RT" in value.upper() and number < _SIGRTMIN):
        raise _Fail(f"unknown signal {_show(value)}: expected a name (SIGTERM, TERM, SIGRTMIN+3) or a number 1-64")
    return value


def _command(rest: str) -> list[str] | str:
    return _json_strings(rest) if rest.startswith("[") else rest


def _parse(line: str, env: Mapping[str, str]) -> tuple[str, Any]:
    if not isinstance(line, str):
        raise _Fail("a change must be a string")
    if any(c in line for c in "\0\n\r"):
        raise _Fail("a change must be a single line with no NUL character")
    parts = line.strip().split(None, 1)
    if not parts:
        raise _Fail("empty instruction")
    word = parts[0]
    instruction = word.upper()
    rest = parts[1].strip() if len(parts) > 1 else ""
    if instruction not in SUPPORTED:
        raise _Fail(f"{_show(word)} is not supported; --change accepts {', '.join(SUPPORTED)}")
    if not rest:
        raise _Fail(f"{instruction}: needs an argument")
    try:
        if instruction in ("CMD", "ENTRYPOINT"):
            return instruction, _command(rest)
        if instruction == "ENV":
            return instruction, _env_pairs(rest, env)
        if instruction == "LABEL":
            return instruction, _label_pairs(rest, env)
        if instruction == "EXPOSE":
            return instruction, _port_specs(rest, env)
        if instruction == "USER":
            return instruction, _user(rest, env)
        if instruction == "WORKDIR":
            return instruction, _workdir(rest, env)
        if instruction == "VOLUME":
            return instruction, _volumes(rest, env)
        return instruction, _stop_signal(rest, env)
    except _Fail as e:
        raise _Fail(f"{instruction}: {e}") from None


def parse_change(line: str, env: Mapping[str, str] | None = None) -> tuple[str, Any]:
    """Parse one change instruction into ``(INSTRUCTION, value)``; ``env`` feeds ``$VAR`` expansion.

    Values: CMD/ENTRYPOINT ``list[str]`` (JSON form) or ``str`` (shell form, verbatim); ENV/LABEL
    ``list[tuple[str, str]]``; EXPOSE ``list[str]`` like ``"80/tcp"`` (ranges expanded); USER, WORKDIR (as
    written, not yet joined) and STOPSIGNAL ``str``; VOLUME ``list[str]``.
    """
    try:
        return _parse(line, env or {})
    except _Fail as e:
        shown = _show(line) if isinstance(line, str) else type(line).__name__
        raise InvalidChange(f"invalid change {shown}: {e}") from None


# --- applying ------------------------------------------------------------------------------------------------


def _string_list(config: Mapping[str, Any], key: str) -> list[str] | None:
    value = config.get(key)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidDocument(f"image config {key} must be a list of strings")
    return value


def _string_map(config: dict[str, Any], key: str) -> dict[str, Any]:
    value = config.get(key)
    if value is None:
        value = config[key] = {}
    if not isinstance(value, dict):
        raise InvalidDocument(f"image config {key} must be an object")
    return value


def _env_map(env: list[str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for entry in env or ():
        key, _, value = entry.partition("=")
        out[key] = value
    return out


def _shell(config: Mapping[str, Any]) -> list[str]:
    shell = _string_list(config, "Shell")
    return list(shell) if shell else list(DEFAULT_SHELL)


def _join_workdir(current: Any, path: str) -> str:
    if current is not None and not isinstance(current, str):
        raise InvalidDocument("image config WorkingDir must be a string")
    if not current:
        current = "/"
    joined = posixpath.normpath(posixpath.join("/", current, path))
    return "/" + joined.lstrip("/")


def apply_changes(config: dict[str, Any], changes: Sequence[str]) -> dict[str, Any]:
    """Apply ``changes`` in order to a copy of ``config`` (the inner ``config`` object) and return the copy.

    Raise :class:`InvalidChange` for an instruction that cannot be applied, :class:`InvalidDocument` when a
    field the change needs to update has the wrong type. ``config`` itself is never modified.
    """
    if not isinstance(config, dict):
        raise InvalidDocument("image config must be an object")
    if isinstance(changes, str):
        raise InvalidChange("changes must be a list of instructions, not a single string")
    out = copy.deepcopy(config)
    cmd_set = False
    for line in changes:
        env = _string_list(out, "Env")
        instruction, value = parse_change(line, _env_map(env))
        if instruction in ("CMD", "ENTRYPOINT"):
            command = value if isinstance(value, list) else [*_shell(out), value]
            if instruction == "CMD":
                out["Cmd"] = command
                cmd_set = True
            else:
                out["Entrypoint"] = command
                if not cmd_set:
                    out["Cmd"] = None
        elif instruction == "ENV":
            entries = list(env or ())
            for key, val in value:
                entry = f"{key}={val}"
                for index, existing in enumerate(entries):
                    if existing.partition("=")[0] == key:
                        entries[index] = entry
                        break
                else:
                    entries.append(entry)
            out["Env"] = entries
        elif instruction == "LABEL":
            labels = _string_map(out, "Labels")
            for key, val in value:
                labels[key] = val
        elif instruction == "EXPOSE":
            ports = _string_map(out, "ExposedPorts")
            for port in value:
                ports.setdefault(port, {})
        elif instruction == "VOLUME":
            volumes = _string_map(out, "Volumes")
            for path in value:
                volumes.setdefault(path, {})
        elif instruction == "USER":
            out["User"] = value
        elif instruction == "WORKDIR":
            out["WorkingDir"] = _join_workdir(out.get("WorkingDir"), value)
        else:
            out["StopSignal"] = value
    return out
