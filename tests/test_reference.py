"""Image reference parsing, normalization, familiar forms and reference filters (lamina.formats.reference)."""

from __future__ import annotations

import re

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from lamina.errors import ImageError, InvalidReference
from lamina.formats.reference import (
    NAME_TOTAL_LENGTH_MAX,
    Reference,
    familiar_match,
    looks_like_id_prefix,
    parse_normalized,
    parse_tag,
)

SHA = "sha256:" + "0123456789abcdef" * 4
SHA512 = "sha512:" + "ab" * 64
HEX64 = "f" * 64


# --- parsing and normalization ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "domain", "path", "tag", "digest"),
    [
        ("busybox", "docker.io", "library/busybox", None, None),
        ("busybox:1.36", "docker.io", "library/busybox", "1.36", None),
        ("library/busybox", "docker.io", "library/busybox", None, None),
        ("docker.io/busybox", "docker.io", "library/busybox", None, None),
        ("docker.io/library/busybox:latest", "docker.io", "library/busybox", "latest", None),
        ("index.docker.io/busybox", "docker.io", "library/busybox", None, None),
        ("index.docker.io/user/app:v1", "docker.io", "user/app", "v1", None),
        ("user/app", "docker.io", "user/app", None, None),
        ("user/team/app", "docker.io", "user/team/app", None, None),
        ("quay.io/org/app:v2", "quay.io", "org/app", "v2", None),
        ("localhost/app", "localhost", "app", None, None),
        ("localhost:5000/app:dev", "localhost:5000", "app", "dev", None),
        ("registry:5000/a/b", "registry:5000", "a/b", None, None),
        ("Registry.Example.COM/app", "Registry.Example.COM", "app", None, None),
        ("[::1]:5000/app", "[::1]:5000", "app", None, None),
        ("[fe80::1]/app", "[fe80::1]", "app", None, None),
        ("192.168.1.10:443/x/y", "192.168.1.10:443", "x/y", None, None),
        (f"app@{SHA}", "docker.io", "library/app", None, SHA),
        (f"app:tag@{SHA}", "docker.io", "library/app", "tag", SHA),
        (f"ghcr.io/o/app@{SHA512}", "ghcr.io", "o/app", None, SHA512),
        # No '/': "localhost:5000" is the repository "localhost" with tag "5000".
        ("localhost:5000", "docker.io", "library/localhost", "5000", None),
        ("localhost", "docker.io", "library/localhost", None, None),
        # The first component is not a domain when it lacks '.', ':' and is not 'localhost'.
        ("myhost/app", "docker.io", "myhost/app", None, None),
        ("a.b-c--d/f_g", "a.b-c--d", "f_g", None, None),
        ("a0-b1.c2_d3", "docker.io", "library/a0-b1.c2_d3", None, None),
        ("app:UPPER_Tag.v-1", "docker.io", "library/app", "UPPER_Tag.v-1", None),
        ("app:_", "docker.io", "library/app", "_", None),
        # A 64-hex name is fine once it has a tag or a namespace.
        (f"{HEX64}:v1", "docker.io", f"library/{HEX64}", "v1", None),
        (f"library/{HEX64}", "docker.io", f"library/{HEX64}", None, None),
        # "sha256:<hex>" is the repository "sha256" with a tag, as in docker.
        (SHA, "docker.io", "library/sha256", SHA.split(":")[1], None),
    ],
)
def test_parse_normalized_fields(text: str, domain: str, path: str, tag: str | None, digest: str | None) -> None:
    ref = parse_normalized(text)
    assert ref == Reference(domain, path, tag, digest)
    assert (ref.domain, ref.path, ref.tag, ref.digest) == (domain, path, tag, digest)
    assert ref.name == f"{domain}/{path}"


@pytest.mark.parametrize(
    ("text", "full", "familiar"),
    [
        ("busybox", "docker.io/library/busybox", "busybox"),
        ("busybox:1.36", "docker.io/library/busybox:1.36", "busybox:1.36"),
        ("user/app:v1", "docker.io/user/app:v1", "user/app:v1"),
        ("library/a/b", "docker.io/library/a/b", "library/a/b"),
        ("quay.io/org/app:v2", "quay.io/org/app:v2", "quay.io/org/app:v2"),
        ("docker.io/library/app:t@" + SHA, "docker.io/library/app:t@" + SHA, "app:t@" + SHA),
        ("localhost:5000/app", "localhost:5000/app", "localhost:5000/app"),
    ],
)
def test_str_and_familiar(text: str, full: str, familiar: str) -> None:
    ref = parse_normalized(text)
    assert str(ref) == full
    assert ref.familiar() == familiar
    assert parse_normalized(familiar) == ref


def test_familiar_keeps_prefixes_that_change_meaning() -> None:
    # Dropping docker.io/ would turn the first path component into a registry domain.
    ref = Reference("docker.io", "foo.bar/baz")
    assert ref.familiar_name() == "docker.io/foo.bar/baz"
    assert parse_normalized(ref.familiar()) == ref
    ref = Reference("docker.io", "localhost/app")
    assert ref.familiar_name() == "docker.io/localhost/app"
    assert parse_normalized(ref.familiar()) == ref
    # Dropping library/ would leave a bare image ID.
    ref = Reference("docker.io", f"library/{HEX64}")
    assert ref.familiar_name() == f"library/{HEX64}"
    assert parse_normalized(ref.familiar()) == ref
    # Nested official-looking paths keep library/.
    assert Reference("docker.io", "library/distros/ubuntu").familiar_name() == "library/distros/ubuntu"


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "empty reference"),
        (" ", "whitespace"),
        ("busy box", "whitespace"),
        ("busybox ", "whitespace"),
        ("busybox\n", "whitespace"),
        ("busy\x00box", "control"),
        ("busy\x7fbox", "control"),
        ("bésy", "non-ASCII"),
        ("Busybox", "must be lowercase"),
        ("Foo/bar", "must be lowercase"),
        ("user/App", "must be lowercase"),
        ("LOCALHOST/app", "must be lowercase"),
        ("localhost:5000/App", "must be lowercase"),
        (HEX64, "cannot specify 64-byte hexadecimal strings"),
        ("busybox:", "empty tag"),
        ("busybox:-x", "invalid tag"),
        ("busybox:.x", "invalid tag"),
        ("busybox:a+b", "invalid tag"),
        ("busybox:" + "a" * 129, "longer than 128"),
        ("busybox@", "invalid digest"),
        ("busybox@sha256:abc", "invalid digest"),
        ("busybox@md5:" + "a" * 32, "invalid digest"),
        ("busybox@sha256:" + "A" * 64, "invalid digest"),
        (f"busybox@{SHA}@{SHA}", "invalid digest"),
        (":tag", "missing repository name"),
        ("@" + SHA, "missing repository name"),
        ("/app", "empty path component"),
        ("user//app", "empty path component"),
        ("user/app/", "empty path component"),
        ("quay.io/", "missing repository name"),
        ("..", "invalid repository name component '..'"),
        ("user/../app", "'..'"),
        ("-app", "'-app'"),
        ("app-", "'app-'"),
        ("app_", "'app_'"),
        ("a___b", "'a___b'"),
        ("a..b", "'a..b'"),
        ("a:b:c", "'a:b'"),
        ("-bad.com/app", "invalid registry domain"),
        ("bad-.com/app", "invalid registry domain"),
        ("bad..com/app", "invalid registry domain"),
        ("host:port/app", "invalid registry domain"),
        ("host:/app", "invalid registry domain"),
        ("[::1/app", "invalid registry domain"),
        ("[zz::1]:5000/app", "invalid registry domain"),
        ("a" * 1000, "too long"),
    ],
)
def test_parse_normalized_rejects(text: str, fragment: str) -> None:
    with pytest.raises(InvalidReference) as info:
        parse_normalized(text)
    message = str(info.value)
    assert fragment in message
    assert "\n" not in message
    assert isinstance(info.value, ImageError)


def test_error_quotes_truncated_input() -> None:
    text = "Upper/" + "x" * 200
    with pytest.raises(InvalidReference) as info:
        parse_normalized(text)
    message = str(info.value)
    assert "'Upper/xxx" in message and "...'" in message
    assert len(message) < 200


def test_non_string_input() -> None:
    with pytest.raises(InvalidReference, match="must be a string"):
        parse_normalized(42)  # type: ignore[arg-type]


def test_name_length_limit() -> None:
    domain = "registry.example.com"
    # domain + "/" + path == 255 characters exactly
    path = "a" * (NAME_TOTAL_LENGTH_MAX - len(domain) - 1)
    ref = parse_normalized(f"{domain}/{path}:tag")
    assert len(ref.name) == NAME_TOTAL_LENGTH_MAX
    with pytest.raises(InvalidReference, match="longer than 255"):
        parse_normalized(f"{domain}/{path}a")
    # The limit applies to the normalized name: docker.io/library/ counts.
    short = "b" * (NAME_TOTAL_LENGTH_MAX - len("docker.io/library/"))
    assert len(parse_normalized(short).name) == NAME_TOTAL_LENGTH_MAX
    with pytest.raises(InvalidReference, match="longer than 255"):
        parse_normalized(short + "b")


# --- Reference construction and derived references ------------------------------------------------------------


def test_reference_constructor_normalizes() -> None:
    assert Reference("index.docker.io", "busybox") == parse_normalized("busybox")
    assert Reference("docker.io", "busybox", "latest").path == "library/busybox"
    assert Reference("quay.io", "busybox").path == "busybox"


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("myhost", "app"), "must contain '.' or ':' or be 'localhost'"),
        (("", "app"), "empty registry domain"),
        (("quay.io", ""), "missing repository name"),
        (("quay.io", "App"), "must be lowercase"),
        (("quay.io", "app", "bad tag"), "invalid tag"),
        (("quay.io", "app", None, "sha256:xyz"), "invalid digest"),
        (("quay io", "app"), "invalid registry domain"),
    ],
)
def test_reference_constructor_validates(args: tuple[str, ...], fragment: str) -> None:
    with pytest.raises(InvalidReference, match=re.escape(fragment)):
        Reference(*args)


def test_reference_constructor_rejects_non_strings() -> None:
    with pytest.raises(InvalidReference):
        Reference("quay.io", 3)  # type: ignore[arg-type]
    with pytest.raises(InvalidReference):
        Reference("quay.io", "app", tag=5)  # type: ignore[arg-type]


def test_reference_is_frozen_and_hashable() -> None:
    ref = parse_normalized("busybox")
    with pytest.raises(AttributeError):
        ref.tag = "x"  # type: ignore[misc]
    assert {ref, parse_normalized("docker.io/library/busybox")} == {ref}


def test_with_default_tag() -> None:
    assert str(parse_normalized("busybox").with_default_tag()) == "docker.io/library/busybox:latest"
    assert parse_normalized("busybox:1").with_default_tag().tag == "1"
    digested = parse_normalized(f"busybox@{SHA}")
    assert digested.with_default_tag() == digested
    assert digested.with_default_tag().tag is None


def test_with_tag_digest_and_name_only() -> None:
    ref = parse_normalized(f"quay.io/org/app:v1@{SHA}")
    assert str(ref.with_tag("v2")) == f"quay.io/org/app:v2@{SHA}"
    assert str(ref.with_digest(SHA512)) == f"quay.io/org/app:v1@{SHA512}"
    assert str(ref.name_only()) == "quay.io/org/app"
    assert ref.name_only().tag is None and ref.name_only().digest is None
    with pytest.raises(InvalidReference, match="invalid tag"):
        ref.with_tag("no good")
    with pytest.raises(InvalidReference, match="invalid digest"):
        ref.with_digest("sha256:short")
    with pytest.raises(InvalidReference):
        ref.with_digest(None)  # type: ignore[arg-type]


@pytest.mark.parametrize("tag", ["latest", "1.36.1", "v1_2-3", "_", "A", "x" * 128])
def test_parse_tag_accepts(tag: str) -> None:
    assert parse_tag(tag) == tag


@pytest.mark.parametrize("tag", ["", "-x", ".x", "a b", "a/b", "a:b", "a@b", "é", "x" * 129, "a\n"])
def test_parse_tag_rejects(tag: str) -> None:
    with pytest.raises(InvalidReference, match="tag"):
        parse_tag(tag)


def test_parse_tag_non_string() -> None:
    with pytest.raises(InvalidReference):
        parse_tag(None)  # type: ignore[arg-type]


# --- ID prefixes -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("abc", True),
        ("0123456789ab", True),
        (HEX64, True),
        ("sha256:abc", True),
        (SHA, True),
        ("ab", False),
        ("f" * 65, False),
        ("ABC", False),
        ("abg", False),
        ("sha256:ab", False),
        ("sha512:abc", False),
        ("busybox", False),
        ("", False),
        ("abc\n", False),
    ],
)
def test_looks_like_id_prefix(text: str, expected: bool) -> None:
    assert looks_like_id_prefix(text) is expected


# --- reference filters -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("busybox", True),
        ("busybox:latest", True),
        ("busybox:*", True),
        ("busy*", True),
        ("busy*:lat*", True),
        ("*", True),
        ("*box", True),
        ("bu?ybox", True),
        ("[a-c]usybox", True),
        ("[^x]usybox", True),
        ("[^b]usybox", False),
        ("bu\\sybox", True),
        ("docker.io/library/busybox", True),
        ("docker.io/library/busybox:*", True),
        ("docker.io/library/*", True),
        ("docker.io/*/busybox:latest", True),
        ("library/busybox", False),
        ("*/busybox", False),
        ("*/*", False),
        ("busybox:1.0", False),
        ("busybox:late", False),
        ("alpine", False),
        ("busyboxx", False),
        ("", False),
    ],
)
def test_familiar_match_official_image(pattern: str, expected: bool) -> None:
    assert familiar_match(pattern, parse_normalized("busybox:latest")) is expected


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("quay.io/org/app", True),
        ("quay.io/org/*", True),
        ("quay.io/*/app:v*", True),
        ("quay.io/*", False),
        ("*/org/app", True),
        ("*/app", False),
        ("org/app", False),
        ("quay.io/org/app:v1", True),
        ("quay.io/org/app:v2", False),
    ],
)
def test_familiar_match_other_registry(pattern: str, expected: bool) -> None:
    assert familiar_match(pattern, parse_normalized("quay.io/org/app:v1")) is expected


def test_familiar_match_user_repo_and_digest() -> None:
    user = parse_normalized("user/app:1")
    assert familiar_match("user/*", user)
    assert familiar_match("user/app:?", user)
    assert not familiar_match("*", user)
    digested = parse_normalized(f"busybox@{SHA}")
    assert familiar_match("busybox", digested)
    assert familiar_match("busybox@sha256:*", digested)


@pytest.mark.parametrize("pattern", ["[", "[]", "[^]", "busy[", "a\\", "[a-", "[-a]", "[a-]", "[\\"])
def test_familiar_match_malformed_pattern(pattern: str) -> None:
    with pytest.raises(InvalidReference, match="malformed pattern"):
        familiar_match(pattern, parse_normalized("busybox"))


def test_familiar_match_class_escapes() -> None:
    ref = parse_normalized("a-b")
    assert familiar_match("a[\\-]b", ref)
    assert familiar_match("a[+-\\-]b", ref)
    assert not familiar_match("a[^\\-]b", ref)


# --- properties --------------------------------------------------------------------------------------------------

_component = st.from_regex(r"[a-z0-9]{1,8}(?:(?:[._]|__|-{1,3})[a-z0-9]{1,8}){0,3}", fullmatch=True)
_label = st.from_regex(r"[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,8}[a-zA-Z0-9])?", fullmatch=True)


@st.composite
def _domains(draw: st.DrawFn) -> str:
    kind = draw(st.sampled_from(["docker", "localhost", "dotted", "port", "ipv6"]))
    if kind == "docker":
        return draw(st.sampled_from(["docker.io", "index.docker.io"]))
    port = draw(st.one_of(st.just(""), st.integers(0, 99999).map(lambda p: f":{p}")))
    if kind == "localhost":
        return "localhost" + port
    if kind == "ipv6":
        # Without a ':' (or a '.') the first component would not be recognised as a domain at all.
        return "[" + draw(st.from_regex(r"[a-fA-F0-9]{0,4}:[a-fA-F0-9:]{0,10}", fullmatch=True)) + "]" + port
    labels = draw(st.lists(_label, min_size=1, max_size=4))
    if kind == "dotted" and len(labels) == 1:
        labels.append("com")
    if kind == "port" and not port:
        port = ":5000"
    return ".".join(labels) + port


@st.composite
def _references(draw: st.DrawFn) -> Reference:
    domain = draw(_domains())
    path = "/".join(draw(st.lists(_component, min_size=1, max_size=4)))
    tag = draw(st.none() | st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}", fullmatch=True))
    digest = draw(
        st.none()
        | st.from_regex(r"[a-f0-9]{64}", fullmatch=True).map(lambda h: "sha256:" + h)
        | st.from_regex(r"[a-f0-9]{128}", fullmatch=True).map(lambda h: "sha512:" + h)
    )
    normalized = "docker.io" if domain == "index.docker.io" else domain
    full_path = path if normalized != "docker.io" or "/" in path else "library/" + path
    assume(len(normalized) + 1 + len(full_path) <= NAME_TOTAL_LENGTH_MAX)
    return Reference(domain, path, tag, digest)


@given(_references())
def test_round_trip_full_string(ref: Reference) -> None:
    assert parse_normalized(str(ref)) == ref


@given(_references())
def test_round_trip_familiar_string(ref: Reference) -> None:
    assert parse_normalized(ref.familiar()) == ref
    assert parse_normalized(ref.familiar_name()) == ref.name_only()


@given(_references())
def test_reference_matches_its_own_forms(ref: Reference) -> None:
    # Escape glob metacharacters (IPv6 domains contain '[' and ']').
    def literal(s: str) -> str:
        return re.sub(r"([*?\[\]\\])", r"\\\1", s)

    for form in (str(ref), ref.familiar(), ref.name, ref.familiar_name()):
        assert familiar_match(literal(form), ref)
    assert ref.with_default_tag().tag is not None or ref.digest is not None


@given(st.text(max_size=80))
def test_arbitrary_text_parses_or_raises_invalid_reference(text: str) -> None:
    try:
        ref = parse_normalized(text)
    except InvalidReference as e:
        assert "\n" not in str(e)
    else:
        assert parse_normalized(str(ref)) == ref


@given(st.text(alphabet="ab*?/[]^-\\", max_size=12))
def test_arbitrary_patterns_match_or_raise_invalid_reference(pattern: str) -> None:
    try:
        familiar_match(pattern, parse_normalized("quay.io/ab/ba:a"))
    except InvalidReference as e:
        assert "malformed pattern" in str(e)


def _oracle(pattern: str, text: str) -> bool:
    # Independent reading of the glob for patterns made only of literals, '*' and '?'.
    regex = "".join("[^/]*" if c == "*" else "[^/]" if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(regex, text) is not None


@given(st.text(alphabet="ab*?/", max_size=10), st.lists(st.sampled_from(["ab", "ba", "a", "b0"]), min_size=1))
def test_glob_agrees_with_regex_oracle(pattern: str, parts: list[str]) -> None:
    ref = Reference("quay.io", "/".join(parts))
    candidates = [ref.familiar(), str(ref), ref.familiar_name(), ref.name]
    assert familiar_match(pattern, ref) == any(_oracle(pattern, c) for c in candidates)


def test_resolve_names_follows_cri_o() -> None:
    from lamina.formats.reference import resolve_names

    assert [str(r) for r in resolve_names("busybox", ["docker.io", "quay.io"])] == [
        "docker.io/library/busybox:latest", "quay.io/busybox:latest"]
    assert [str(r) for r in resolve_names("team/app:2", ["127.0.0.1:5000"])] == ["127.0.0.1:5000/team/app:2"]
    assert [str(r) for r in resolve_names("localhost/app", ["docker.io"])] == ["localhost/app:latest"]
    digest = "sha256:" + "a" * 64
    assert [str(r) for r in resolve_names(f"example.com/app@{digest}", [])] == [f"example.com/app@{digest}"]
    with pytest.raises(InvalidReference, match="none are configured"):
        resolve_names("busybox", [])
    with pytest.raises(InvalidReference, match="64-byte"):
        resolve_names("a" * 64, ["docker.io"])
