"""OCI / Docker schema2 documents, descriptors, image configs and platform matching (lamina.formats.oci)."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lamina.errors import FormatError, InvalidDocument, PlatformNotFound
from lamina.formats import oci
from lamina.formats.oci import (
    MAX_DOCUMENT_BYTES,
    MEDIA_TYPE_CONFIG,
    MEDIA_TYPE_DOCKER_CONFIG,
    MEDIA_TYPE_DOCKER_LAYER,
    MEDIA_TYPE_DOCKER_LAYER_FOREIGN,
    MEDIA_TYPE_DOCKER_LAYER_FOREIGN_GZIP,
    MEDIA_TYPE_DOCKER_LAYER_GZIP,
    MEDIA_TYPE_DOCKER_MANIFEST,
    MEDIA_TYPE_DOCKER_MANIFEST_LIST,
    MEDIA_TYPE_DOCKER_SCHEMA1_MANIFEST,
    MEDIA_TYPE_DOCKER_SCHEMA1_SIGNED_MANIFEST,
    MEDIA_TYPE_INDEX,
    MEDIA_TYPE_LAYER,
    MEDIA_TYPE_LAYER_GZIP,
    MEDIA_TYPE_LAYER_NONDISTRIBUTABLE,
    MEDIA_TYPE_LAYER_NONDISTRIBUTABLE_GZIP,
    MEDIA_TYPE_LAYER_NONDISTRIBUTABLE_ZSTD,
    MEDIA_TYPE_LAYER_ZSTD,
    MEDIA_TYPE_MANIFEST,
    Descriptor,
    Index,
    Manifest,
    Platform,
    PlatformMatcher,
    build_index,
    build_manifest,
    digest_of,
    format_platform,
    host_platform,
    is_index_type,
    is_layer_type,
    is_manifest_type,
    is_non_distributable,
    layer_compression,
    parse_config,
    parse_document,
    parse_index,
    parse_manifest,
    parse_platform,
    select_manifest,
)

D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64
D3 = "sha256:" + "3" * 64
D512 = "sha512:" + "a" * 128


def desc(media_type: Any = MEDIA_TYPE_LAYER_GZIP, digest: Any = D1, size: Any = 1, **kw: Any) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": digest, "size": size, **kw}


def manifest_doc(**over: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": MEDIA_TYPE_MANIFEST,
        "config": desc(MEDIA_TYPE_CONFIG, D1, 10),
        "layers": [desc(MEDIA_TYPE_LAYER_GZIP, D2, 20), desc(MEDIA_TYPE_LAYER_ZSTD, D3, 30)],
    }
    doc.update(over)
    return {k: v for k, v in doc.items() if v is not _DROP}


def index_doc(**over: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": MEDIA_TYPE_INDEX,
        "manifests": [desc(MEDIA_TYPE_MANIFEST, D1, 100, platform={"os": "linux", "architecture": "amd64"})],
    }
    doc.update(over)
    return {k: v for k, v in doc.items() if v is not _DROP}


_DROP = object()


def enc(doc: Any) -> bytes:
    return json.dumps(doc).encode()


def config_doc(**over: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "architecture": "amd64",
        "os": "linux",
        "created": "2024-01-02T03:04:05.123456789Z",
        "author": "someone",
        "config": {"Env": ["PATH=/bin"], "Cmd": ["sh"], "Labels": {"a": "b"}},
        "rootfs": {"type": "layers", "diff_ids": [D1, D2]},
        "history": [
            {"created_by": "ADD x /", "created": "2024-01-01T00:00:00Z"},
            {"created_by": "ENV a=b", "empty_layer": True},
            {"created_by": "RUN y"},
        ],
    }
    doc.update(over)
    return {k: v for k, v in doc.items() if v is not _DROP}


# -- media types ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("media_type", "compression"),
    [
        (MEDIA_TYPE_LAYER, "none"),
        (MEDIA_TYPE_LAYER_GZIP, "gzip"),
        (MEDIA_TYPE_LAYER_ZSTD, "zstd"),
        (MEDIA_TYPE_LAYER_NONDISTRIBUTABLE, "none"),
        (MEDIA_TYPE_LAYER_NONDISTRIBUTABLE_GZIP, "gzip"),
        (MEDIA_TYPE_LAYER_NONDISTRIBUTABLE_ZSTD, "zstd"),
        (MEDIA_TYPE_DOCKER_LAYER, "none"),
        (MEDIA_TYPE_DOCKER_LAYER_GZIP, "gzip"),
        (MEDIA_TYPE_DOCKER_LAYER_FOREIGN, "none"),
        (MEDIA_TYPE_DOCKER_LAYER_FOREIGN_GZIP, "gzip"),
    ],
)
def test_layer_types_and_compression(media_type: str, compression: str) -> None:
    assert is_layer_type(media_type)
    assert layer_compression(media_type) == compression
    assert not is_manifest_type(media_type) and not is_index_type(media_type)


def test_media_type_constants_are_the_published_strings() -> None:
    assert MEDIA_TYPE_MANIFEST == "application/vnd.oci.image.manifest.v1+json"
    assert MEDIA_TYPE_INDEX == "application/vnd.oci.image.index.v1+json"
    assert MEDIA_TYPE_CONFIG == "application/vnd.oci.image.config.v1+json"
    assert MEDIA_TYPE_LAYER_ZSTD == "application/vnd.oci.image.layer.v1.tar+zstd"
    assert MEDIA_TYPE_LAYER_NONDISTRIBUTABLE_GZIP == "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
    assert MEDIA_TYPE_DOCKER_MANIFEST == "application/vnd.docker.distribution.manifest.v2+json"
    assert MEDIA_TYPE_DOCKER_MANIFEST_LIST == "application/vnd.docker.distribution.manifest.list.v2+json"
    assert MEDIA_TYPE_DOCKER_CONFIG == "application/vnd.docker.container.image.v1+json"
    assert MEDIA_TYPE_DOCKER_LAYER_GZIP == "application/vnd.docker.image.rootfs.diff.tar.gzip"
    assert MEDIA_TYPE_DOCKER_LAYER_FOREIGN_GZIP == "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
    assert MEDIA_TYPE_DOCKER_SCHEMA1_MANIFEST == "application/vnd.docker.distribution.manifest.v1+json"
    assert MEDIA_TYPE_DOCKER_SCHEMA1_SIGNED_MANIFEST == "application/vnd.docker.distribution.manifest.v1+prettyjws"


@pytest.mark.parametrize(
    "media_type",
    [MEDIA_TYPE_MANIFEST, MEDIA_TYPE_INDEX, MEDIA_TYPE_CONFIG, MEDIA_TYPE_DOCKER_CONFIG, "application/json", ""],
)
def test_layer_compression_rejects_non_layers(media_type: str) -> None:
    assert not is_layer_type(media_type)
    with pytest.raises(InvalidDocument, match="not a layer media type"):
        layer_compression(media_type)


def test_kind_helpers() -> None:
    assert is_manifest_type(MEDIA_TYPE_MANIFEST) and is_manifest_type(MEDIA_TYPE_DOCKER_MANIFEST)
    assert is_index_type(MEDIA_TYPE_INDEX) and is_index_type(MEDIA_TYPE_DOCKER_MANIFEST_LIST)
    assert not is_manifest_type(MEDIA_TYPE_INDEX) and not is_index_type(MEDIA_TYPE_MANIFEST)
    assert not is_manifest_type(MEDIA_TYPE_DOCKER_SCHEMA1_SIGNED_MANIFEST)
    assert not is_manifest_type(MEDIA_TYPE_MANIFEST.upper())
    for mt in (MEDIA_TYPE_LAYER_NONDISTRIBUTABLE, MEDIA_TYPE_LAYER_NONDISTRIBUTABLE_ZSTD,
               MEDIA_TYPE_DOCKER_LAYER_FOREIGN, MEDIA_TYPE_DOCKER_LAYER_FOREIGN_GZIP):  # fmt: skip
        assert is_non_distributable(mt)
    for mt in (MEDIA_TYPE_LAYER, MEDIA_TYPE_LAYER_GZIP, MEDIA_TYPE_DOCKER_LAYER_GZIP, MEDIA_TYPE_MANIFEST):
        assert not is_non_distributable(mt)


def test_digest_of() -> None:
    assert digest_of(b"") == "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert digest_of(bytearray(b"abc")) == digest_of(b"abc")  # type: ignore[arg-type]


# -- descriptors ---------------------------------------------------------------------------------------------


def test_descriptor_round_trip() -> None:
    obj = desc(
        MEDIA_TYPE_LAYER_GZIP,
        D512,
        2**53,
        annotations={"b": "2", "a": "1"},
        urls=["https://example.com/blob"],
        platform={"architecture": "arm", "os": "linux", "variant": "v7", "os.features": ["x"], "os.version": "1"},
        artifactType="ignored",
        data="aWdub3JlZA==",
    )
    d = Descriptor.from_json(obj)
    assert d.media_type == MEDIA_TYPE_LAYER_GZIP and d.digest == D512 and d.size == 2**53
    assert d.annotations == {"a": "1", "b": "2"}
    assert d.urls == ("https://example.com/blob",)
    assert d.platform == Platform("linux", "arm", "v7", "1", ("x",))
    out = d.to_json()
    assert list(out) == ["mediaType", "digest", "size", "urls", "annotations", "platform"]
    assert list(out["annotations"]) == ["a", "b"]
    assert Descriptor.from_json(out) == d
    assert hash(d) == hash(Descriptor.from_json(out))
    assert Descriptor(MEDIA_TYPE_LAYER, D1, 0).to_json() == {"mediaType": MEDIA_TYPE_LAYER, "digest": D1, "size": 0}


def test_descriptor_null_optional_members_are_absent() -> None:
    d = Descriptor.from_json(desc(annotations=None, urls=None, platform=None))
    assert d.annotations == {} and d.urls == () and d.platform is None


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        ([], "descriptor must be an object, got an array"),
        (None, "must be an object, got null"),
        ("x", "must be an object"),
        ({"digest": D1, "size": 1}, "has no mediaType"),
        ({"mediaType": MEDIA_TYPE_LAYER, "size": 1}, "has no digest"),
        ({"mediaType": MEDIA_TYPE_LAYER, "digest": D1}, "has no size"),
        (desc(media_type=1), "mediaType must be a string, got a number"),
        (desc(media_type=None), "mediaType must be a string, got null"),
        (desc(media_type=""), "is not a media type"),
        (desc(media_type="application"), "is not a media type"),
        (desc(media_type="application/json; charset=utf-8"), "is not a media type"),
        (desc(media_type="application/ json"), "is not a media type"),
        (desc(media_type="application/json\n"), "is not a media type"),
        (desc(media_type="-app/json"), "is not a media type"),
        (desc(media_type="a/" + "b" * 128), "is not a media type"),
        (desc(media_type="application/vnd.\u00e9"), "is not a media type"),
        (desc(digest="sha256:" + "A" * 64), "invalid digest"),
        (desc(digest="sha256:" + "a" * 63), "invalid digest"),
        (desc(digest="md5:" + "a" * 32), "invalid digest"),
        (desc(digest="sha256:" + "a" * 64 + "\n"), "invalid digest"),
        (desc(digest=" sha256:" + "a" * 64), "invalid digest"),
        (desc(digest=5), "digest must be a string"),
        (desc(digest=None), "digest must be a string"),
        (desc(size=-1), "must not be negative"),
        (desc(size=True), "size must be an integer, got a boolean"),
        (desc(size=False), "size must be an integer, got a boolean"),
        (desc(size=1.0), "size must be an integer, got a number"),
        (desc(size="1"), "size must be an integer, got a string"),
        (desc(size=None), "size must be an integer, got null"),
        (desc(size=2**53 + 1), "larger than 2\\*\\*53"),
        (desc(size=10**300), "larger than 2\\*\\*53"),
        (desc(annotations=[]), "annotations must be an object of strings, got an array"),
        (desc(annotations={"a": 1}), "annotations\\['a'\\] must be a string, got a number"),
        (desc(annotations={"a": None}), "must be a string, got null"),
        (desc(annotations="a=b"), "annotations must be an object"),
        (desc(urls="https://x"), "urls must be an array of strings, got a string"),
        (desc(urls=[1]), "urls\\[0\\] must be a string"),
        (desc(urls={}), "urls must be an array"),
        (desc(platform=[]), "platform must be an object"),
        (desc(platform={"os": "linux"}), "platform.architecture must be a string, got null"),
        (desc(platform={"architecture": "amd64"}), "platform.os must be a string"),
        (desc(platform={"os": 1, "architecture": "amd64"}), "platform.os must be a string, got a number"),
        (desc(platform={"os": "linux", "architecture": "amd64", "variant": 7}), "platform.variant must be a string"),
        (desc(platform={"os": "linux", "architecture": "amd64", "os.version": []}), "os.version must be a string"),
        (desc(platform={"os": "linux", "architecture": "amd64", "os.features": "x"}), "os.features must be an array"),
        (desc(platform={"os": "linux", "architecture": "amd64", "os.features": [1]}), r"os.features\[0\] must be"),
    ],
)
def test_descriptor_rejects(obj: Any, message: str) -> None:
    with pytest.raises(InvalidDocument, match=message):
        Descriptor.from_json(obj)


def test_descriptor_error_names_where() -> None:
    with pytest.raises(InvalidDocument, match=r"^layers\[1\]\.size must not be negative"):
        parse_manifest(enc(manifest_doc(layers=[desc(), desc(size=-5)])))


def test_descriptor_constructor_validates() -> None:
    with pytest.raises(InvalidDocument):
        Descriptor("nope", D1, 1)
    with pytest.raises(InvalidDocument):
        Descriptor(MEDIA_TYPE_LAYER, "sha256:x", 1)
    with pytest.raises(InvalidDocument):
        Descriptor(MEDIA_TYPE_LAYER, D1, -1)
    with pytest.raises(InvalidDocument):
        Descriptor(MEDIA_TYPE_LAYER, D1, True)
    with pytest.raises(InvalidDocument):
        Descriptor(MEDIA_TYPE_LAYER, D1, 1, urls="https://x")  # type: ignore[arg-type]
    with pytest.raises(InvalidDocument):
        Descriptor(MEDIA_TYPE_LAYER, D1, 1, annotations={"a": 1})  # type: ignore[dict-item]
    with pytest.raises(InvalidDocument):
        Descriptor(MEDIA_TYPE_LAYER, D1, 1, platform="linux/amd64")  # type: ignore[arg-type]
    d = Descriptor(MEDIA_TYPE_LAYER, D1, 1, urls=["u"])  # type: ignore[arg-type]
    assert d.urls == ("u",)


def test_descriptor_copies_annotations() -> None:
    notes = {"a": "b"}
    d = Descriptor(MEDIA_TYPE_LAYER, D1, 1, annotations=notes)
    notes["c"] = "d"
    assert d.annotations == {"a": "b"}


# -- manifests ----------------------------------------------------------------------------------------------


def test_parse_oci_manifest() -> None:
    raw = enc(manifest_doc(annotations={"org.opencontainers.image.created": "now"}))
    m = parse_manifest(raw)
    assert isinstance(m, Manifest)
    assert m.schema_version == 2 and m.media_type == MEDIA_TYPE_MANIFEST
    assert m.config == Descriptor(MEDIA_TYPE_CONFIG, D1, 10)
    assert [layer.digest for layer in m.layers] == [D2, D3]
    assert m.annotations == {"org.opencontainers.image.created": "now"}
    assert m.raw == raw and m.digest == digest_of(raw)
    assert parse_manifest(raw, MEDIA_TYPE_MANIFEST) == m
    assert parse_document(raw) == m
    assert hash(m) == hash(parse_manifest(raw))


def test_parse_docker_manifest() -> None:
    doc = manifest_doc(
        mediaType=MEDIA_TYPE_DOCKER_MANIFEST,
        config=desc(MEDIA_TYPE_DOCKER_CONFIG, D1, 10),
        layers=[desc(MEDIA_TYPE_DOCKER_LAYER_GZIP), desc(MEDIA_TYPE_DOCKER_LAYER_FOREIGN_GZIP, urls=["https://x"])],
    )
    m = parse_manifest(enc(doc), MEDIA_TYPE_DOCKER_MANIFEST)
    assert m.media_type == MEDIA_TYPE_DOCKER_MANIFEST
    assert m.layers[1].urls == ("https://x",)
    assert is_non_distributable(m.layers[1].media_type)


def test_manifest_without_media_type_uses_hint_or_defaults_to_oci() -> None:
    raw = enc(manifest_doc(mediaType=_DROP))
    assert parse_manifest(raw).media_type == MEDIA_TYPE_MANIFEST
    assert parse_manifest(raw, MEDIA_TYPE_DOCKER_MANIFEST).media_type == MEDIA_TYPE_DOCKER_MANIFEST
    assert parse_document(raw).media_type == MEDIA_TYPE_MANIFEST


def test_hint_may_be_a_content_type_header() -> None:
    raw = enc(manifest_doc())
    assert parse_manifest(raw, "Application/VND.oci.image.manifest.v1+json; charset=utf-8").media_type == (
        MEDIA_TYPE_MANIFEST
    )


def test_mixed_docker_and_oci_types_are_accepted() -> None:
    doc = manifest_doc(config=desc(MEDIA_TYPE_DOCKER_CONFIG), layers=[desc(MEDIA_TYPE_DOCKER_LAYER), desc()])
    assert len(parse_manifest(enc(doc)).layers) == 2


def test_manifest_with_no_layers_is_accepted() -> None:
    assert parse_manifest(enc(manifest_doc(layers=[]))).layers == ()


@pytest.mark.parametrize(
    ("doc", "hint", "message"),
    [
        (manifest_doc(), MEDIA_TYPE_DOCKER_MANIFEST, "disagrees with"),
        (manifest_doc(mediaType=MEDIA_TYPE_DOCKER_MANIFEST), MEDIA_TYPE_MANIFEST, "disagrees with"),
        (manifest_doc(), MEDIA_TYPE_INDEX, "is not an image manifest"),
        (manifest_doc(), "application/json", "is not an image manifest"),
        (manifest_doc(mediaType=MEDIA_TYPE_INDEX), None, "media type disagrees with content"),
        (manifest_doc(mediaType="application/vnd.oci.artifact.manifest.v1+json"), None, "unsupported document media"),
        (manifest_doc(mediaType=5), None, "mediaType must be a string"),
        (manifest_doc(manifests=[]), None, "media type disagrees with content"),
        (manifest_doc(manifests=None), None, "media type disagrees with content"),
        (manifest_doc(mediaType=_DROP, manifests=[]), None, "both manifests and config/layers"),
        (manifest_doc(mediaType=_DROP, manifests=[]), MEDIA_TYPE_MANIFEST, "media type disagrees with content"),
        (manifest_doc(schemaVersion=_DROP), None, "schemaVersion must be 2, got none"),
        (manifest_doc(schemaVersion=3), None, "schemaVersion must be 2, got 3"),
        (manifest_doc(schemaVersion="2"), None, "schemaVersion must be 2"),
        (manifest_doc(schemaVersion=2.0), None, "schemaVersion must be 2"),
        (manifest_doc(schemaVersion=True), None, "schemaVersion must be 2"),
        (manifest_doc(schemaVersion=None), None, "schemaVersion must be 2"),
        (manifest_doc(schemaVersion=1), None, "schema1 manifests are not supported"),
        (manifest_doc(mediaType=MEDIA_TYPE_DOCKER_SCHEMA1_MANIFEST), None, "schema1 manifests are not supported"),
        (manifest_doc(), MEDIA_TYPE_DOCKER_SCHEMA1_SIGNED_MANIFEST, "schema1 manifests are not supported"),
        (manifest_doc(config=_DROP), None, "manifest has no config"),
        (manifest_doc(config=None), None, "config must be an object, got null"),
        (manifest_doc(config=[]), None, "config must be an object"),
        (manifest_doc(config=desc(MEDIA_TYPE_LAYER_GZIP)), None, "is not an image config"),
        (manifest_doc(config=desc("application/vnd.oci.empty.v1+json")), None, "is not an image config"),
        (manifest_doc(config=desc(MEDIA_TYPE_CONFIG, size=-1)), None, "config.size must not be negative"),
        (manifest_doc(layers=_DROP), None, "manifest has no layers"),
        (manifest_doc(layers=None), None, "layers must be an array, got null"),
        (manifest_doc(layers={}), None, "layers must be an array, got an object"),
        (manifest_doc(layers=[None]), None, r"layers\[0\] must be an object"),
        (manifest_doc(layers=[desc(MEDIA_TYPE_CONFIG)]), None, r"layers\[0\] media type .* is not a layer type"),
        (manifest_doc(layers=[desc("application/vnd.in-toto+json")]), None, "is not a layer type"),
        (manifest_doc(layers=[desc(digest="sha256:zz")]), None, r"layers\[0\]\.digest: invalid digest"),
        (manifest_doc(annotations=[]), None, "annotations must be an object"),
        (manifest_doc(annotations={"a": 1}), None, "must be a string"),
    ],
)
def test_parse_manifest_rejects(doc: dict[str, Any], hint: str | None, message: str) -> None:
    with pytest.raises(InvalidDocument, match=message):
        parse_manifest(enc(doc), hint)


def test_schema1_by_hint_wins_over_garbage() -> None:
    with pytest.raises(InvalidDocument, match=r"^schema1 manifests are not supported$"):
        parse_document(b"not json", MEDIA_TYPE_DOCKER_SCHEMA1_MANIFEST)


def test_real_schema1_document() -> None:
    doc = {"schemaVersion": 1, "name": "x", "tag": "latest", "architecture": "amd64", "fsLayers": [], "history": []}
    with pytest.raises(InvalidDocument, match="schema1"):
        parse_document(enc(doc))


# -- hostile bytes ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "not valid JSON"),
        (b"   ", "not valid JSON"),
        (b"[]", "must be a JSON object, got an array"),
        (b"null", "must be a JSON object, got null"),
        (b"2", "must be a JSON object, got a number"),
        (b'"x"', "must be a JSON object, got a string"),
        (b"true", "must be a JSON object, got a boolean"),
        (b"{", "not valid JSON"),
        (b'{"a":1}x', "not valid JSON"),
        (b"\xff\xfe{}", "not valid UTF-8"),
        (b'{"a":"\xc3"}', "not valid UTF-8"),
        (b"\xef\xbb\xbf{}", "not valid JSON"),
        (b'{"schemaVersion":2,"schemaVersion":2}', "duplicate key 'schemaVersion'"),
        (b'{"a":{"b":1,"b":2}}', "duplicate key 'b'"),
        (b'{"a":NaN}', "NaN is not valid JSON"),
        (b'{"a":-Infinity}', "-Infinity is not valid JSON"),
        (b'{"a":' + b"[" * 200_000 + b"]" * 200_000 + b"}", "not valid JSON"),
        (b'{"a":' + b"9" * 5000 + b"}", "not valid JSON"),
        (b"{}", "schemaVersion must be 2, got none"),
        (b'{"schemaVersion":2}', "neither manifests nor config/layers"),
    ],
)
def test_hostile_bytes(data: bytes, message: str) -> None:
    with pytest.raises(InvalidDocument, match=message):
        parse_document(data)


def test_document_size_limit() -> None:
    doc = manifest_doc(annotations={"pad": ""})
    base = len(enc(doc))
    doc["annotations"]["pad"] = "x" * (MAX_DOCUMENT_BYTES - base)
    assert len(enc(doc)) == MAX_DOCUMENT_BYTES
    assert parse_manifest(enc(doc)).annotations["pad"]
    doc["annotations"]["pad"] += "x"
    with pytest.raises(InvalidDocument, match="over the 4194304 byte limit"):
        parse_manifest(enc(doc))
    with pytest.raises(InvalidDocument, match="over the"):
        parse_config(b" " * (MAX_DOCUMENT_BYTES + 1))


def test_non_bytes_input() -> None:
    with pytest.raises(InvalidDocument, match="must be bytes, got str"):
        parse_document("{}")  # type: ignore[arg-type]
    with pytest.raises(InvalidDocument, match="media type must be a string"):
        parse_document(enc(manifest_doc()), 5)  # type: ignore[arg-type]
    assert isinstance(parse_document(memoryview(enc(manifest_doc()))), Manifest)  # type: ignore[arg-type]


def test_errors_are_one_line() -> None:
    try:
        parse_document(b'{\n"a":\n')
    except InvalidDocument as e:
        assert "\n" not in str(e)
    else:  # pragma: no cover
        raise AssertionError("expected InvalidDocument")


# -- indexes -----------------------------------------------------------------------------------------------


def test_parse_index() -> None:
    doc = index_doc(
        manifests=[
            desc(MEDIA_TYPE_MANIFEST, D1, 100, platform={"os": "linux", "architecture": "amd64"}),
            desc(MEDIA_TYPE_INDEX, D2, 50),
            desc("application/vnd.example.thing+json", D3, 5),  # unknown entry types are carried, not refused
        ],
        annotations={"x": "y"},
    )
    raw = enc(doc)
    idx = parse_index(raw)
    assert isinstance(idx, Index)
    assert idx.media_type == MEDIA_TYPE_INDEX and idx.schema_version == 2
    assert [d.digest for d in idx.manifests] == [D1, D2, D3]
    assert idx.annotations == {"x": "y"}
    assert idx.raw == raw and idx.digest == digest_of(raw)
    assert parse_document(raw) == idx
    assert parse_index(raw, MEDIA_TYPE_INDEX) == idx


def test_parse_docker_manifest_list_and_inference() -> None:
    raw = enc(index_doc(mediaType=MEDIA_TYPE_DOCKER_MANIFEST_LIST))
    assert parse_index(raw, MEDIA_TYPE_DOCKER_MANIFEST_LIST).media_type == MEDIA_TYPE_DOCKER_MANIFEST_LIST
    raw = enc(index_doc(mediaType=_DROP))
    assert parse_index(raw).media_type == MEDIA_TYPE_INDEX
    assert parse_document(raw, MEDIA_TYPE_DOCKER_MANIFEST_LIST).media_type == MEDIA_TYPE_DOCKER_MANIFEST_LIST
    assert parse_index(enc(index_doc(manifests=[]))).manifests == ()


@pytest.mark.parametrize(
    ("doc", "hint", "message"),
    [
        (index_doc(layers=[]), None, "media type disagrees with content"),
        (index_doc(config=desc(MEDIA_TYPE_CONFIG)), None, "media type disagrees with content"),
        (index_doc(mediaType=_DROP), MEDIA_TYPE_MANIFEST, "is not an image index"),
        (index_doc(mediaType=_DROP, layers=[]), MEDIA_TYPE_INDEX, "media type disagrees with content"),
        (index_doc(), MEDIA_TYPE_DOCKER_MANIFEST_LIST, "disagrees with"),
        (index_doc(mediaType=MEDIA_TYPE_MANIFEST), None, "media type disagrees with content"),
        (index_doc(manifests=None), None, "manifests must be an array, got null"),
        (index_doc(manifests=_DROP), MEDIA_TYPE_INDEX, "index has no manifests"),
        (index_doc(manifests={}), None, "manifests must be an array"),
        (index_doc(manifests=[1]), None, r"manifests\[0\] must be an object"),
        (index_doc(manifests=[desc(size=True)]), None, r"manifests\[0\]\.size must be an integer"),
        (index_doc(manifests=[desc(platform="linux/amd64")]), None, r"manifests\[0\]\.platform must be an object"),
        (index_doc(schemaVersion=1), None, "schema1"),
        (index_doc(annotations={"k": ["v"]}), None, "must be a string, got an array"),
    ],
)
def test_parse_index_rejects(doc: dict[str, Any], hint: str | None, message: str) -> None:
    with pytest.raises(InvalidDocument, match=message):
        parse_index(enc(doc), hint)


def test_parse_manifest_refuses_an_index() -> None:
    with pytest.raises(InvalidDocument, match="expected an image manifest"):
        parse_manifest(enc(index_doc()))
    with pytest.raises(InvalidDocument, match="expected an image index"):
        parse_index(enc(manifest_doc()))


# -- image config -----------------------------------------------------------------------------------------


def test_parse_config() -> None:
    raw = enc(config_doc(variant="v8", architecture="arm64", **{"os.version": "x", "os.features": ["f"]}))
    c = parse_config(raw)
    assert c.raw == raw and c.digest == digest_of(raw)
    assert c.doc["author"] == "someone"
    assert (c.architecture, c.os, c.variant, c.os_version, c.os_features) == ("arm64", "linux", "v8", "x", ("f",))
    assert c.platform == Platform("linux", "arm64", "v8", "x", ("f",))
    assert c.created == "2024-01-02T03:04:05.123456789Z" and c.author == "someone"
    assert c.config["Cmd"] == ["sh"]
    assert c.diff_ids == (D1, D2)
    assert len(c.history) == 3 and c.non_empty_history_count() == 2
    assert c.labels == {"a": "b"}
    c.labels["z"] = "mutating the copy"
    assert c.labels == {"a": "b"}


def test_parse_config_minimal() -> None:
    c = parse_config(enc({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}}))
    assert c.config == {} and c.history == () and c.diff_ids == () and c.labels == {}
    assert c.created is None and c.author is None and c.variant is None and c.os_version is None
    assert c.non_empty_history_count() == 0


def test_parse_config_tolerates_go_nulls() -> None:
    doc = config_doc(config=None, history=None, rootfs={"type": "layers", "diff_ids": None}, variant="")
    c = parse_config(enc(doc))
    assert c.config == {} and c.history == () and c.diff_ids == () and c.variant is None
    c = parse_config(enc(config_doc(rootfs={"type": "layers"}, config={"Labels": None, "Env": None})))
    assert c.diff_ids == () and c.labels == {}


@pytest.mark.parametrize("missing", [_DROP, None, ""])
def test_parse_config_defaults_os_and_architecture_to_the_hosts(missing: object) -> None:
    host = host_platform()
    doc = config_doc(os=missing, architecture=missing)
    c = parse_config(enc(doc))
    assert (c.os, c.architecture, c.variant) == (host.os, host.architecture, host.variant)
    assert c.raw == enc(doc)  # the bytes, and so the image ID, are untouched
    c = parse_config(enc(config_doc(os=missing, architecture="arm64", variant="v8")))
    assert (c.os, c.architecture, c.variant) == (host.os, "arm64", "v8")
    c = parse_config(enc(config_doc(os="windows", architecture=missing)))
    assert (c.os, c.architecture) == ("windows", host.architecture)


def test_history_mismatch_is_tolerated() -> None:
    c = parse_config(enc(config_doc(history=[{"created_by": "x"}])))
    assert c.non_empty_history_count() == 1 and len(c.diff_ids) == 2


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        (config_doc(architecture=1), "architecture must be a string"),
        (config_doc(os=1), "os must be a string, got a number"),
        (config_doc(variant=8), "variant must be a string"),
        (config_doc(created=0), "created must be a string"),
        (config_doc(author=[]), "author must be a string"),
        (config_doc(**{"os.features": "x"}), "os.features must be an array"),
        (config_doc(rootfs=_DROP), "has no rootfs"),
        (config_doc(rootfs=[]), "rootfs must be an object"),
        (config_doc(rootfs={"diff_ids": []}), "rootfs.type must be 'layers', got None"),
        (config_doc(rootfs={"type": "Layers", "diff_ids": []}), "rootfs.type must be 'layers'"),
        (config_doc(rootfs={"type": "layers", "diff_ids": {}}), "rootfs.diff_ids must be an array"),
        (config_doc(rootfs={"type": "layers", "diff_ids": [1]}), r"rootfs.diff_ids\[0\] must be a string"),
        (config_doc(rootfs={"type": "layers", "diff_ids": [D1, "sha256:abc"]}), r"diff_ids\[1\]: invalid digest"),
        (config_doc(config=[]), "config must be an object"),
        (config_doc(config={"Env": "A=b"}), "config.Env must be an array of strings"),
        (config_doc(config={"Cmd": [1]}), r"config.Cmd\[0\] must be a string"),
        (config_doc(config={"Entrypoint": "sh"}), "config.Entrypoint must be an array"),
        (config_doc(config={"User": 0}), "config.User must be a string"),
        (config_doc(config={"WorkingDir": []}), "config.WorkingDir must be a string"),
        (config_doc(config={"ExposedPorts": ["80/tcp"]}), "config.ExposedPorts must be an object"),
        (config_doc(config={"Volumes": "/data"}), "config.Volumes must be an object"),
        (config_doc(config={"ArgsEscaped": "yes"}), "config.ArgsEscaped must be a boolean"),
        (config_doc(config={"Labels": {"a": 1}}), r"config.Labels\['a'\] must be a string"),
        (config_doc(config={"Labels": ["a"]}), "config.Labels must be an object"),
        (config_doc(history={}), "history must be an array"),
        (config_doc(history=["RUN x"]), r"history\[0\] must be an object"),
        (config_doc(history=[{"empty_layer": "true"}]), r"history\[0\].empty_layer must be a boolean"),
        (config_doc(history=[{"empty_layer": 1}]), "must be a boolean, got a number"),
        (config_doc(history=[{"created_by": 5}]), r"history\[0\].created_by must be a string"),
    ],
)
def test_parse_config_rejects(doc: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidDocument, match=message):
        parse_config(enc(doc))


@pytest.mark.parametrize("data", [b"[]", b"", b"\x80", b'{"os":"linux","os":"linux"}', b'{"a": NaN}'])
def test_parse_config_hostile_bytes(data: bytes) -> None:
    with pytest.raises(InvalidDocument, match=r"^image config"):
        parse_config(data)


# -- platforms: parsing and formatting ------------------------------------------------------------------------


@pytest.fixture
def amd64_host(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("lamina.formats.oci._host.system", lambda: "Linux")
    monkeypatch.setattr("lamina.formats.oci._host.machine", lambda: "x86_64")
    monkeypatch.setattr("lamina.formats.oci._pointer_size", lambda: 8)


@pytest.mark.usefixtures("amd64_host")
@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("linux/amd64", Platform("linux", "amd64")),
        ("linux/x86_64", Platform("linux", "amd64")),
        ("linux/x86-64", Platform("linux", "amd64")),
        ("linux/amd64/v1", Platform("linux", "amd64")),
        ("linux/amd64/v3", Platform("linux", "amd64", "v3")),
        ("Linux/AMD64/V2", Platform("linux", "amd64", "v2")),
        ("linux/arm64", Platform("linux", "arm64")),
        ("linux/arm64/v8", Platform("linux", "arm64")),
        ("linux/arm64/8", Platform("linux", "arm64")),
        ("linux/aarch64", Platform("linux", "arm64")),
        ("linux/arm64/v8.2", Platform("linux", "arm64", "v8.2")),
        ("linux/arm", Platform("linux", "arm", "v7")),
        ("linux/arm/7", Platform("linux", "arm", "v7")),
        ("linux/arm/v6", Platform("linux", "arm", "v6")),
        ("linux/arm/5", Platform("linux", "arm", "v5")),
        ("linux/armhf", Platform("linux", "arm", "v7")),
        ("linux/armel", Platform("linux", "arm", "v6")),
        ("linux/i386", Platform("linux", "386")),
        ("linux/i686", Platform("linux", "386")),
        ("linux/386", Platform("linux", "386")),
        ("linux/s390x", Platform("linux", "s390x")),
        ("macos/arm64", Platform("darwin", "arm64")),
        ("linux", Platform("linux", "amd64")),
        ("windows", Platform("windows", "amd64")),
        ("arm64", Platform("linux", "arm64")),
        ("aarch64", Platform("linux", "arm64")),
        ("armhf", Platform("linux", "arm", "v7")),
        ("windows(10.0.17763)/amd64", Platform("windows", "amd64", os_version="10.0.17763")),
        ("windows(10.0.17763+win32k+a)/amd64", Platform("windows", "amd64", None, "10.0.17763", ("a", "win32k"))),
        ("windows(+win32k)/amd64", Platform("windows", "amd64", os_features=("win32k",))),
        ("linux(1%2B2)/amd64", Platform("linux", "amd64", os_version="1+2")),
    ],
)
def test_parse_platform(spec: str, expected: Platform) -> None:
    assert parse_platform(spec) == expected


@pytest.mark.parametrize(
    "spec",
    ["", "/", "linux/", "/amd64", "linux/amd64/v8/x", "linux/*", "*", "linux/am d64", "linux/amd64/v8 ", "foo",
     "linux//v7", "lin(ux/amd64", "amd64(1)", "linux(%zz)/amd64", "linux(%ff)/amd64", "linux\n/amd64", "linux/amd64\n"],
)  # fmt: skip
def test_parse_platform_rejects(spec: str) -> None:
    with pytest.raises(FormatError, match="platform"):
        parse_platform(spec)


def test_parse_platform_rejects_non_string() -> None:
    with pytest.raises(FormatError):
        parse_platform(None)  # type: ignore[arg-type]


def test_format_platform() -> None:
    assert format_platform(Platform("linux", "arm64", "v8")) == "linux/arm64/v8"
    assert format_platform(Platform("linux", "amd64")) == "linux/amd64"
    assert format_platform(Platform("", "amd64")) == "unknown"
    assert format_platform(Platform("linux", "")) == "linux"
    assert format_platform(Platform("windows", "amd64", None, "10.0", ("b", "a"))) == "windows(10.0+a+b)/amd64"
    assert format_platform(Platform("linux", "amd64", None, "a+b(c)/%")) == "linux(a%2Bb%28c%29%2F%25)/amd64"
    assert str(Platform("linux", "arm", "v7")) == "linux/arm/v7"


def test_platform_empty_strings_become_none() -> None:
    assert Platform("linux", "amd64", "", "") == Platform("linux", "amd64")
    assert Platform("linux", "amd64", os_features=["a"]).os_features == ("a",)  # type: ignore[arg-type]


def test_platform_json_round_trip() -> None:
    p = Platform("windows", "amd64", "v2", "10.0.1", ("win32k",))
    j = p.to_json()
    assert list(j) == ["architecture", "os", "os.version", "os.features", "variant"]
    assert Platform.from_json(j) == p
    assert Platform("linux", "amd64").to_json() == {"architecture": "amd64", "os": "linux"}


_word = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_", min_size=1, max_size=8)
_option = st.text(max_size=8)


@given(
    os_name=_word,
    arch=_word,
    variant=st.none() | _word,
    os_version=st.none() | _option,
    features=st.lists(_option.filter(bool), max_size=3),
)
def test_format_parse_round_trip(
    os_name: str, arch: str, variant: str | None, os_version: str | None, features: list[str]
) -> None:
    p = Platform(os_name, arch, variant, os_version, tuple(features)).normalized()
    assert parse_platform(format_platform(p)) == p


@pytest.mark.parametrize(
    ("system", "machine", "bits", "expected"),
    [
        ("Linux", "x86_64", 8, Platform("linux", "amd64")),
        ("Linux", "x86_64", 4, Platform("linux", "386")),
        ("Linux", "aarch64", 8, Platform("linux", "arm64")),
        ("Linux", "aarch64", 4, Platform("linux", "arm", "v8")),
        ("Linux", "armv7l", 4, Platform("linux", "arm", "v7")),
        ("Linux", "armv6l", 4, Platform("linux", "arm", "v6")),
        ("Linux", "i686", 4, Platform("linux", "386")),
        ("Linux", "ppc64le", 8, Platform("linux", "ppc64le")),
        ("Linux", "loongarch64", 8, Platform("linux", "loong64")),
        ("Darwin", "arm64", 8, Platform("darwin", "arm64")),
        ("FreeBSD", "amd64", 8, Platform("freebsd", "amd64")),
    ],
)
def test_host_platform(
    monkeypatch: pytest.MonkeyPatch, system: str, machine: str, bits: int, expected: Platform
) -> None:
    monkeypatch.setattr("lamina.formats.oci._host.system", lambda: system)
    monkeypatch.setattr("lamina.formats.oci._host.machine", lambda: machine)
    monkeypatch.setattr("lamina.formats.oci._pointer_size", lambda: bits)
    assert host_platform() == expected


def test_host_platform_windows_has_os_version(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("lamina.formats.oci._host.system", lambda: "Windows")
    monkeypatch.setattr("lamina.formats.oci._host.machine", lambda: "AMD64")
    monkeypatch.setattr("lamina.formats.oci._host.version", lambda: "10.0.20348")
    assert host_platform() == Platform("windows", "amd64", os_version="10.0.20348")


def test_host_platform_is_normalized() -> None:
    p = host_platform()
    assert p == p.normalized() and p.os and p.architecture


# -- platforms: matching -------------------------------------------------------------------------------------


def P(spec: str) -> Platform:
    """A platform as an index would declare it: os/arch[/variant], not normalized."""
    parts = spec.split("/")
    return Platform(parts[0], parts[1], parts[2] if len(parts) > 2 else None)


@pytest.mark.parametrize(
    ("want", "candidate", "matches"),
    [
        ("linux/amd64", "linux/amd64", True),
        ("linux/amd64", "linux/x86_64", True),
        ("linux/amd64", "linux/amd64/v1", True),
        ("linux/amd64", "linux/386", True),
        ("linux/amd64", "linux/amd64/v2", False),
        ("linux/amd64/v3", "linux/amd64/v2", True),
        ("linux/amd64/v3", "linux/amd64", True),
        ("linux/amd64/v3", "linux/386", True),
        ("linux/amd64/v3", "linux/amd64/v4", False),
        ("linux/amd64/v2", "linux/amd64/v3", False),
        ("linux/amd64", "windows/amd64", False),
        ("linux/amd64", "linux/arm64", False),
        ("linux/arm64", "linux/arm64", True),
        ("linux/arm64", "linux/arm64/v8", True),
        ("linux/arm64", "linux/aarch64", True),
        ("linux/arm64", "linux/arm/v8", True),
        ("linux/arm64", "linux/arm/v7", True),
        ("linux/arm64", "linux/arm", True),
        ("linux/arm64", "linux/arm/v6", True),
        ("linux/arm64", "linux/arm/v5", True),
        ("linux/arm64", "linux/arm64/v8.1", False),
        ("linux/arm64", "linux/amd64", False),
        ("linux/arm64/v8.2", "linux/arm64/v8.1", True),
        ("linux/arm64/v8.2", "linux/arm64", True),
        ("linux/arm64/v8.2", "linux/arm64/v8.3", False),
        ("linux/arm64/v9.1", "linux/arm64/v9", True),
        ("linux/arm64/v9.1", "linux/arm64/v8.6", True),
        ("linux/arm64/v9.1", "linux/arm64/v8.7", False),
        ("linux/arm64/v9", "linux/arm64/v8.5", True),
        ("linux/arm/v7", "linux/arm/v7", True),
        ("linux/arm/v7", "linux/arm", True),
        ("linux/arm/v7", "linux/armhf", True),
        ("linux/arm/v7", "linux/arm/v6", True),
        ("linux/arm/v7", "linux/armel", True),
        ("linux/arm/v7", "linux/arm/v5", True),
        ("linux/arm/v7", "linux/arm/v8", False),
        ("linux/arm/v7", "linux/arm64", False),
        ("linux/arm/v6", "linux/arm/v7", False),
        ("linux/arm/v8", "linux/arm/v7", True),
        # docker's fallback: a candidate without a variant matches on os/arch alone
        ("linux/arm/v6", "linux/arm", True),
        ("linux/arm/v5", "linux/arm", True),
        ("linux/arm/v5", "linux/armhf", True),  # declared without a variant, so the fallback applies
        ("linux/arm64/v8.2", "linux/aarch64", True),
        ("linux/amd64", "linux/amd64/v3", False),
    ],
)
def test_matcher(want: str, candidate: str, matches: bool) -> None:
    assert PlatformMatcher(P(want)).match(P(candidate)) is matches


def test_matcher_os_features_and_windows_versions() -> None:
    want = Platform("windows", "amd64", None, "10.0.17763.100", ("win32k",))
    m = PlatformMatcher(want)
    assert m.match(Platform("windows", "amd64", None, "10.0.17763.5", ("win32k",)))
    assert m.match(Platform("windows", "amd64"))
    assert not m.match(Platform("windows", "amd64", None, "10.0.20348.1"))
    assert not m.match(Platform("windows", "amd64", None, "garbage"))
    assert not m.match(Platform("windows", "amd64", None, None, ("other",)))
    ltsc = PlatformMatcher(Platform("windows", "amd64", None, "10.0.26100.1"))
    assert ltsc.match(Platform("windows", "amd64", None, "10.0.20348.2"))
    assert not ltsc.match(Platform("windows", "amd64", None, "10.0.17763.1"))
    assert PlatformMatcher(Platform("linux", "amd64")).match(Platform("linux", "amd64", None, "anything"))


def test_matcher_ordering() -> None:
    m = PlatformMatcher(parse_platform("linux/arm64"))
    candidates = [P("linux/arm/v5"), P("linux/amd64"), P("linux/arm/v7"), P("linux/arm64"), P("linux/arm/v8")]
    ranked = sorted((c for c in candidates if m.match(c)), key=lambda c: m.rank(c) or 0)
    assert [format_platform(c) for c in ranked] == ["linux/arm64", "linux/arm/v8", "linux/arm/v7", "linux/arm/v5"]
    assert m.less(P("linux/arm64"), P("linux/arm/v7"))
    assert not m.less(P("linux/arm/v7"), P("linux/arm64"))
    assert m.less(P("linux/arm/v5"), P("linux/amd64"))
    assert not m.less(P("linux/amd64"), P("linux/arm/v5"))
    assert not m.less(P("linux/amd64"), P("linux/s390x"))
    assert not m.less(P("linux/arm64"), P("linux/aarch64"))
    amd = PlatformMatcher(parse_platform("linux/amd64/v3"))
    assert amd.less(P("linux/amd64/v3"), P("linux/amd64/v2"))
    assert amd.less(P("linux/amd64/v2"), P("linux/amd64"))
    assert amd.less(P("linux/amd64"), P("linux/386"))
    fallback = PlatformMatcher(parse_platform("linux/arm/v5"))
    assert fallback.less(P("linux/arm/v5"), P("linux/arm"))
    assert "linux/arm/v5" in repr(fallback)


# -- selecting a manifest ------------------------------------------------------------------------------------


def entry(spec: str | None, digest: str = D1, media_type: str = MEDIA_TYPE_MANIFEST, **kw: Any) -> dict[str, Any]:
    extra: dict[str, Any] = dict(kw)
    if spec is not None:
        extra["platform"] = P(spec).to_json()
    return desc(media_type, digest, 100, **extra)


def index_of(*entries: dict[str, Any]) -> Index:
    return parse_index(enc(index_doc(manifests=list(entries))))


def _digest(n: int) -> str:
    return f"sha256:{n:064x}"


def test_select_exact_and_compatible() -> None:
    idx = index_of(
        entry("linux/amd64", _digest(1)),
        entry("linux/arm/v6", _digest(2)),
        entry("linux/arm/v7", _digest(3)),
        entry("linux/arm64/v8", _digest(4)),
        entry("linux/386", _digest(5)),
    )
    assert select_manifest(idx, parse_platform("linux/amd64")).digest == _digest(1)
    assert select_manifest(idx, parse_platform("linux/arm64")).digest == _digest(4)
    assert select_manifest(idx, parse_platform("linux/arm/v7")).digest == _digest(3)
    assert select_manifest(idx, parse_platform("linux/arm/v6")).digest == _digest(2)
    assert select_manifest(idx, parse_platform("linux/386")).digest == _digest(5)
    only_arm = index_of(entry("linux/arm/v6", _digest(2)), entry("linux/arm/v7", _digest(3)))
    assert select_manifest(only_arm, parse_platform("linux/arm64")).digest == _digest(3)
    only_386 = index_of(entry("linux/386", _digest(5)))
    assert select_manifest(only_386, parse_platform("linux/amd64/v2")).digest == _digest(5)


def test_select_prefers_best_variant_regardless_of_order() -> None:
    idx = index_of(entry("linux/amd64", _digest(1)), entry("linux/amd64/v3", _digest(3)), entry("linux/amd64/v2"))
    assert select_manifest(idx, parse_platform("linux/amd64/v3")).digest == _digest(3)
    assert select_manifest(idx, parse_platform("linux/amd64/v4")).digest == _digest(3)
    assert select_manifest(idx, parse_platform("linux/amd64")).digest == _digest(1)


def test_select_first_of_equals_wins() -> None:
    idx = index_of(entry("linux/arm64", _digest(1)), entry("linux/aarch64/v8", _digest(2)))
    assert select_manifest(idx, parse_platform("linux/arm64")).digest == _digest(1)


def test_select_skips_attestations_and_non_manifests() -> None:
    attest = {"vnd.docker.reference.type": "attestation-manifest", "vnd.docker.reference.digest": _digest(1)}
    idx = index_of(
        entry("unknown/unknown", _digest(9)),
        entry("linux/amd64", _digest(8), annotations=attest),
        entry(None, _digest(7), annotations=attest),
        entry("linux/amd64", _digest(6), media_type="application/vnd.example+json"),
        entry("linux/amd64", _digest(1)),
    )
    assert select_manifest(idx, parse_platform("linux/amd64")).digest == _digest(1)
    with pytest.raises(PlatformNotFound):
        select_manifest(index_of(entry("unknown/unknown", _digest(9))), Platform("unknown", "unknown"))


def test_select_unplatformed_entry_is_a_last_resort() -> None:
    idx = index_of(entry(None, _digest(1)), entry("linux/amd64", _digest(2)), entry(None, _digest(3)))
    assert select_manifest(idx, parse_platform("linux/amd64")).digest == _digest(2)
    assert select_manifest(idx, parse_platform("linux/s390x")).digest == _digest(1)


def test_select_nested_index_entry() -> None:
    idx = index_of(entry("linux/amd64", _digest(4), media_type=MEDIA_TYPE_INDEX))
    assert select_manifest(idx, parse_platform("linux/amd64")).media_type == MEDIA_TYPE_INDEX


def test_select_not_found_lists_available() -> None:
    idx = index_of(entry("linux/amd64"), entry("linux/arm/v7"), entry("linux/amd64", _digest(2)))
    with pytest.raises(PlatformNotFound) as err:
        select_manifest(idx, parse_platform("linux/s390x"))
    assert str(err.value) == "no manifest for platform linux/s390x; available: linux/amd64, linux/arm/v7"
    with pytest.raises(PlatformNotFound, match="available: none"):
        select_manifest(index_of(), parse_platform("linux/amd64"))


@pytest.mark.usefixtures("amd64_host")
def test_select_defaults_to_host() -> None:
    idx = index_of(entry("linux/arm64", _digest(1)), entry("linux/amd64", _digest(2)))
    assert select_manifest(idx).digest == _digest(2)


# -- building ----------------------------------------------------------------------------------------------


CONFIG = Descriptor(MEDIA_TYPE_CONFIG, D1, 10)
LAYER = Descriptor(MEDIA_TYPE_LAYER_GZIP, D2, 20)


def test_build_manifest_is_deterministic_compact_json() -> None:
    data = build_manifest(CONFIG, [LAYER], annotations={"z": "1", "a": "2"})
    text = data.decode()
    assert text.startswith('{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{')
    assert " " not in text
    assert list(json.loads(text)) == ["schemaVersion", "mediaType", "config", "layers", "annotations"]
    assert text.endswith('"annotations":{"a":"2","z":"1"}}')
    assert build_manifest(CONFIG, [LAYER], annotations={"a": "2", "z": "1"}) == data
    m = parse_manifest(data)
    assert m.config == CONFIG and m.layers == (LAYER,) and m.digest == digest_of(data)
    assert "annotations" not in json.loads(build_manifest(CONFIG, []))


def test_build_docker_manifest() -> None:
    cfg = Descriptor(MEDIA_TYPE_DOCKER_CONFIG, D1, 10)
    layer = Descriptor(MEDIA_TYPE_DOCKER_LAYER_GZIP, D2, 20)
    data = build_manifest(cfg, (layer,), media_type=MEDIA_TYPE_DOCKER_MANIFEST)
    assert parse_manifest(data, MEDIA_TYPE_DOCKER_MANIFEST).media_type == MEDIA_TYPE_DOCKER_MANIFEST
    with pytest.raises(InvalidDocument, match="carry no annotations"):
        build_manifest(cfg, [layer], media_type=MEDIA_TYPE_DOCKER_MANIFEST, annotations={"a": "b"})


def test_build_index() -> None:
    m1 = Descriptor(MEDIA_TYPE_MANIFEST, D1, 100, platform=Platform("linux", "amd64"))
    m2 = Descriptor(MEDIA_TYPE_MANIFEST, D2, 100, platform=Platform("linux", "arm64", "v8"))
    data = build_index([m1, m2], {"k": "v"})
    assert list(json.loads(data)) == ["schemaVersion", "mediaType", "manifests", "annotations"]
    idx = parse_index(data)
    assert idx.manifests == (m1, m2) and idx.annotations == {"k": "v"}
    lst = build_index([m1], media_type=MEDIA_TYPE_DOCKER_MANIFEST_LIST)
    assert parse_index(lst).media_type == MEDIA_TYPE_DOCKER_MANIFEST_LIST
    with pytest.raises(InvalidDocument, match="carry no annotations"):
        build_index([m1], {"a": "b"}, media_type=MEDIA_TYPE_DOCKER_MANIFEST_LIST)
    empty = b'{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}'
    assert build_index([]) == empty


def test_build_rejects_bad_input() -> None:
    with pytest.raises(InvalidDocument, match="not an image manifest media type"):
        build_manifest(CONFIG, [LAYER], media_type=MEDIA_TYPE_INDEX)
    with pytest.raises(InvalidDocument, match="is not an image config"):
        build_manifest(LAYER, [LAYER])
    with pytest.raises(InvalidDocument, match=r"layers\[0\] media type .* is not a layer type"):
        build_manifest(CONFIG, [CONFIG])
    with pytest.raises(InvalidDocument, match="config must be a Descriptor"):
        build_manifest({"mediaType": MEDIA_TYPE_CONFIG}, [])  # type: ignore[arg-type]
    with pytest.raises(InvalidDocument, match=r"layers\[1\] must be a Descriptor"):
        build_manifest(CONFIG, [LAYER, "x"])  # type: ignore[list-item]
    with pytest.raises(InvalidDocument, match="layers must be a sequence"):
        build_manifest(CONFIG, "abc")  # type: ignore[arg-type]
    with pytest.raises(InvalidDocument, match="must be a string"):
        build_manifest(CONFIG, [LAYER], annotations={"a": 1})  # type: ignore[dict-item]
    with pytest.raises(InvalidDocument, match="not an image index media type"):
        build_index([], media_type=MEDIA_TYPE_MANIFEST)
    with pytest.raises(InvalidDocument, match=r"manifests\[0\] must be a Descriptor"):
        build_index([None])  # type: ignore[list-item]
    with pytest.raises(InvalidDocument, match="manifests must be a sequence"):
        build_index(None)  # type: ignore[arg-type]
    with pytest.raises(InvalidDocument, match="over the"):
        build_manifest(CONFIG, [LAYER], annotations={"pad": "x" * MAX_DOCUMENT_BYTES})


# -- property tests -----------------------------------------------------------------------------------------

_hex = "0123456789abcdef"
digests = st.one_of(
    st.text(alphabet=_hex, min_size=64, max_size=64).map(lambda h: "sha256:" + h),
    st.text(alphabet=_hex, min_size=128, max_size=128).map(lambda h: "sha512:" + h),
)
sizes = st.integers(min_value=0, max_value=2**53)
texts = st.text(max_size=20)
annotation_maps = st.dictionaries(texts, texts, max_size=4)
platforms = st.builds(
    Platform,
    os=st.sampled_from(["linux", "windows", "darwin", "unknown", ""]),
    architecture=st.sampled_from(["amd64", "arm64", "arm", "386", "x86_64", "s390x"]),
    variant=st.none() | st.sampled_from(["v5", "v6", "v7", "v8", "v8.2", "v2", "v3"]),
    os_version=st.none() | texts.filter(bool),
    os_features=st.lists(texts, max_size=3).map(tuple),
)


def descriptors(media_types: st.SearchStrategy[str]) -> st.SearchStrategy[Descriptor]:
    return st.builds(
        Descriptor,
        media_type=media_types,
        digest=digests,
        size=sizes,
        annotations=annotation_maps,
        platform=st.none() | platforms,
        urls=st.lists(texts, max_size=2).map(tuple),
    )


config_descriptors = descriptors(st.sampled_from(sorted(oci.CONFIG_TYPES)))
layer_descriptors = descriptors(st.sampled_from(sorted(oci.LAYER_TYPES)))
any_descriptors = descriptors(
    st.sampled_from([MEDIA_TYPE_MANIFEST, MEDIA_TYPE_DOCKER_MANIFEST, MEDIA_TYPE_INDEX, "application/x.y+json"])
)


@given(config=config_descriptors, layers=st.lists(layer_descriptors, max_size=5), notes=annotation_maps)
def test_manifest_round_trip(config: Descriptor, layers: list[Descriptor], notes: dict[str, str]) -> None:
    data = build_manifest(config, layers, annotations=notes)
    m = parse_document(data)
    assert isinstance(m, Manifest)
    assert m.config == config and m.layers == tuple(layers) and m.annotations == notes
    assert m.media_type == MEDIA_TYPE_MANIFEST and m.raw == data
    assert build_manifest(m.config, m.layers, annotations=m.annotations) == data


@given(config=config_descriptors, layers=st.lists(layer_descriptors, max_size=3))
def test_docker_manifest_round_trip(config: Descriptor, layers: list[Descriptor]) -> None:
    data = build_manifest(config, layers, media_type=MEDIA_TYPE_DOCKER_MANIFEST)
    m = parse_manifest(data, MEDIA_TYPE_DOCKER_MANIFEST)
    assert m.config == config and m.layers == tuple(layers) and m.media_type == MEDIA_TYPE_DOCKER_MANIFEST


@given(entries=st.lists(any_descriptors, max_size=5), notes=annotation_maps)
def test_index_round_trip(entries: list[Descriptor], notes: dict[str, str]) -> None:
    data = build_index(entries, notes)
    idx = parse_document(data)
    assert isinstance(idx, Index)
    assert idx.manifests == tuple(entries) and idx.annotations == notes
    assert build_index(idx.manifests, idx.annotations) == data


@given(d=any_descriptors)
def test_descriptor_json_round_trip(d: Descriptor) -> None:
    assert Descriptor.from_json(json.loads(json.dumps(d.to_json()))) == d


@given(want=platforms, candidate=platforms)
def test_matcher_is_consistent(want: Platform, candidate: Platform) -> None:
    m = PlatformMatcher(want)
    assert m.match(candidate) == (m.rank(candidate) is not None)
    assert not m.less(candidate, candidate)
    if m.match(want):
        assert m.rank(want) == 0
    assert m.match(candidate) == m.match(candidate.normalized()) or candidate.variant is None


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner, max_size=3),
    max_leaves=10,
)


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=200))
def test_arbitrary_bytes_only_raise_invalid_document(data: bytes) -> None:
    for parse in (parse_document, parse_config):
        with contextlib.suppress(InvalidDocument):
            parse(data)


_MANIFEST_PATHS = [
    ("schemaVersion",), ("mediaType",), ("config",), ("config", "mediaType"), ("config", "digest"),
    ("config", "size"), ("config", "annotations"), ("config", "platform"), ("config", "urls"), ("layers",),
    ("layers", 0), ("layers", 0, "size"), ("layers", 0, "platform"), ("annotations",), ("manifests",),
]  # fmt: skip
_CONFIG_PATHS = [
    ("architecture",), ("os",), ("variant",), ("created",), ("config",), ("config", "Labels"), ("config", "Env"),
    ("config", "Cmd"), ("rootfs",), ("rootfs", "type"), ("rootfs", "diff_ids"), ("rootfs", "diff_ids", 0),
    ("history",), ("history", 0), ("history", 1, "empty_layer"), ("os.features",),
]  # fmt: skip


def _set(doc: Any, path: tuple[str | int, ...], value: Any) -> Any:
    doc = json.loads(json.dumps(doc))
    target = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return doc


@given(path=st.sampled_from(_MANIFEST_PATHS), value=json_values, hint=st.none() | st.sampled_from(
    [MEDIA_TYPE_MANIFEST, MEDIA_TYPE_INDEX, MEDIA_TYPE_DOCKER_MANIFEST, "text/plain"]))  # fmt: skip
def test_mistyped_manifest_fields_only_raise_invalid_document(
    path: tuple[str | int, ...], value: Any, hint: str | None
) -> None:
    data = enc(_set(manifest_doc(), path, value))
    for parse in (parse_document, parse_manifest, parse_index):
        with contextlib.suppress(InvalidDocument):
            parse(data, hint)


@given(path=st.sampled_from(_CONFIG_PATHS), value=json_values)
def test_mistyped_config_fields_only_raise_invalid_document(path: tuple[str | int, ...], value: Any) -> None:
    try:
        c = parse_config(enc(_set(config_doc(), path, value)))
    except InvalidDocument:
        return
    assert isinstance(c.labels, dict)
    assert c.non_empty_history_count() >= 0
    assert isinstance(c.platform, Platform)


@given(spec=st.text(alphabet="linuxamd64arv78/()+%.*_- ", max_size=24))
def test_parse_platform_only_raises_format_error(spec: str) -> None:
    try:
        p = parse_platform(spec)
    except FormatError:
        return
    assert p == p.normalized()
