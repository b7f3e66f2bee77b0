"""Dockerfile-style --change instructions applied to an image config (lamina.formats.imageconfig)."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lamina.errors import ImageError, InvalidChange, InvalidDocument
from lamina.formats.imageconfig import apply_changes, parse_change


def base() -> dict[str, Any]:
    return {
        "Env": ["PATH=/usr/local/bin:/usr/bin", "HOME=/root"],
        "Cmd": ["/bin/sh"],
        "Entrypoint": None,
        "WorkingDir": "/srv",
        "Labels": {"maintainer": "me"},
        "ExposedPorts": {"22/tcp": {}},
        "Volumes": None,
    }


def test_input_is_not_modified() -> None:
    config = base()
    before = copy.deepcopy(config)
    out = apply_changes(
        config, ["ENV A=1", "LABEL x=y", "EXPOSE 80", "VOLUME /data", 'CMD ["x"]', "WORKDIR w", "USER u"]
    )
    assert config == before
    assert out is not config
    assert out["Labels"] is not config["Labels"]
    assert out["ExposedPorts"] is not config["ExposedPorts"]


def test_no_changes_is_an_equal_copy() -> None:
    config = base()
    assert apply_changes(config, []) == config


def test_changes_must_be_a_list() -> None:
    with pytest.raises(InvalidChange, match="list"):
        apply_changes(base(), "CMD x")


def test_config_must_be_a_dict() -> None:
    with pytest.raises(InvalidDocument):
        apply_changes([], ["CMD x"])  # type: ignore[arg-type]


# --- CMD and ENTRYPOINT ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ('CMD ["nginx", "-g", "daemon off;"]', ["nginx", "-g", "daemon off;"]),
        ("CMD []", []),
        ('cmd ["a b"]', ["a b"]),
        ('CMD   [ "x" ]  ', ["x"]),
        ('CMD ["\\u00e9", "\\"q\\""]', ["é", '"q"']),
        ("CMD echo hello", ["/bin/sh", "-c", "echo hello"]),
        ('CMD echo "$HOME"  > /tmp/x', ["/bin/sh", "-c", 'echo "$HOME"  > /tmp/x']),
        ("Cmd exec  nginx", ["/bin/sh", "-c", "exec  nginx"]),
    ],
)
def test_cmd(change: str, expected: list[str]) -> None:
    out = apply_changes(base(), [change])
    assert out["Cmd"] == expected
    assert out["Entrypoint"] is None


def test_shell_form_uses_config_shell() -> None:
    config = base() | {"Shell": ["/bin/bash", "-o", "pipefail", "-c"]}
    out = apply_changes(config, ["CMD a | b", "ENTRYPOINT run"])
    assert out["Entrypoint"] == ["/bin/bash", "-o", "pipefail", "-c", "run"]
    assert out["Cmd"] == ["/bin/bash", "-o", "pipefail", "-c", "a | b"]


def test_entrypoint_clears_inherited_cmd() -> None:
    out = apply_changes(base(), ['ENTRYPOINT ["/entry.sh"]'])
    assert out["Entrypoint"] == ["/entry.sh"]
    assert out["Cmd"] is None


def test_entrypoint_keeps_cmd_given_earlier_in_the_same_changes() -> None:
    out = apply_changes(base(), ['CMD ["--serve"]', "ENTRYPOINT /entry.sh"])
    assert out["Entrypoint"] == ["/bin/sh", "-c", "/entry.sh"]
    assert out["Cmd"] == ["--serve"]
    # A CMD after the ENTRYPOINT wins too.
    out = apply_changes(base(), ['ENTRYPOINT ["e"]', 'CMD ["c"]'])
    assert (out["Entrypoint"], out["Cmd"]) == (["e"], ["c"])


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ("CMD", "CMD: needs an argument"),
        ("ENTRYPOINT   ", "ENTRYPOINT: needs an argument"),
        ('CMD ["a", 1]', "array of strings"),
        ("CMD [oops", "CMD: malformed JSON"),
        ('ENTRYPOINT ["a",]', "ENTRYPOINT: malformed JSON"),
        ('CMD ["a"] trailing', "malformed JSON"),
        ("CMD " + "[" * 5000, "malformed JSON"),
    ],
)
def test_cmd_entrypoint_errors(change: str, fragment: str) -> None:
    with pytest.raises(InvalidChange, match="invalid change") as info:
        apply_changes(base(), [change])
    assert fragment in str(info.value)


def test_cmd_json_object_is_shell_form_string() -> None:
    # Only '[' starts the JSON form; anything else is a shell command line.
    assert apply_changes(base(), ['CMD {"a": 1}'])["Cmd"] == ["/bin/sh", "-c", '{"a": 1}']


# --- ENV -----------------------------------------------------------------------------------------------------------


def test_env_replaces_in_place_and_appends() -> None:
    out = apply_changes(base(), ["ENV HOME=/home/app NEW=1"])
    assert out["Env"] == ["PATH=/usr/local/bin:/usr/bin", "HOME=/home/app", "NEW=1"]


def test_env_on_empty_config() -> None:
    assert apply_changes({}, ["ENV A=1"]) == {"Env": ["A=1"]}
    assert apply_changes({"Env": None}, ["ENV A=1", "ENV B=2", "ENV A=3"]) == {"Env": ["A=3", "B=2"]}


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ("ENV A=1", [("A", "1")]),
        ("env a=1 b=2", [("a", "1"), ("b", "2")]),
        ('ENV K2="v 2"', [("K2", "v 2")]),
        ("ENV K='v  2'", [("K", "v  2")]),
        ("ENV K=a\\ b", [("K", "a b")]),
        ('ENV K="say \\"hi\\""', [("K", 'say "hi"')]),
        ('ENV K="back\\\\slash"', [("K", "back\\slash")]),
        ('ENV K="keep\\n"', [("K", "keep\\n")]),
        ("ENV K='no $HOME \\ here'", [("K", "no $HOME \\ here")]),
        ("ENV K=", [("K", "")]),
        ('ENV K=""', [("K", "")]),
        ("ENV K=a=b", [("K", "a=b")]),
        ('ENV K=pre"mid dle"post', [("K", "premid dlepost")]),
        # legacy form: the rest of the line is the value
        ("ENV K some value", [("K", "some value")]),
        ("ENV K   spaced   out  ", [("K", "spaced   out")]),
        ('ENV K "quoted value"', [("K", "quoted value")]),
        ("ENV K no=split here", [("K", "no=split here")]),
    ],
)
def test_env_parsing(change: str, expected: list[tuple[str, str]]) -> None:
    assert parse_change(change) == ("ENV", expected)


@pytest.mark.parametrize(
    ("change", "value"),
    [
        ("ENV P=/opt/bin:$PATH", "/opt/bin:/usr/bin"),
        ("ENV P=${PATH}:/x", "/usr/bin:/x"),
        ('ENV P="$HOME/dir"', "/root/dir"),
        ("ENV P='$HOME'", "$HOME"),
        ("ENV P=\\$HOME", "$HOME"),
        ('ENV P="\\$HOME"', "$HOME"),
        ("ENV P=$UNSET", ""),
        ("ENV P=${UNSET:-fallback}", "fallback"),
        ("ENV P=${EMPTY:-fallback}", "fallback"),
        ("ENV P=${EMPTY-fallback}", ""),
        ("ENV P=${UNSET-fallback}", "fallback"),
        ("ENV P=${HOME:+set}", "set"),
        ("ENV P=${EMPTY:+set}", ""),
        ("ENV P=${EMPTY+set}", "set"),
        ("ENV P=${UNSET+set}", ""),
        ("ENV P=${UNSET:-${HOME}/x}", "/root/x"),
        ("ENV P=${UNSET:-'a}b'}", "a}b"),
        ("ENV P=cost$", "cost$"),
        ("ENV P=$1", "$1"),
        ("ENV P=a$HOME.b", "a/root.b"),
    ],
)
def test_env_expansion(change: str, value: str) -> None:
    env = {"PATH": "/usr/bin", "HOME": "/root", "EMPTY": ""}
    assert parse_change(change, env) == ("ENV", [("P", value)])


def test_env_expansion_uses_env_before_the_instruction() -> None:
    out = apply_changes({"Env": ["A=old"]}, ["ENV A=new B=$A", "ENV C=$A"])
    assert out["Env"] == ["A=new", "B=old", "C=new"]


def test_env_path_prepend_against_image_env() -> None:
    out = apply_changes(base(), ["ENV PATH=/opt/app/bin:$PATH"])
    assert out["Env"][0] == "PATH=/opt/app/bin:/usr/local/bin:/usr/bin"


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ("ENV", "ENV: needs an argument"),
        ("ENV A", "ENV: 'A' needs a value"),
        ("ENV =x", "ENV: variable names cannot be empty"),
        ("ENV A=1 B", "ENV: missing '=' in 'B'"),
        ('ENV A="x', "ENV: unterminated double quote"),
        ("ENV A='x", "ENV: unterminated single quote"),
        ("ENV A=${B", "missing '}'"),
        ("ENV A=${B:-x", "missing '}'"),
        ("ENV A=${", "bad variable substitution"),
        ("ENV A=${1}", "bad variable substitution"),
        ("ENV A=${B?err}", "unsupported variable substitution"),
        ("ENV A=${B#pre}", "unsupported variable substitution"),
        ('ENV "A B"=1', "invalid variable name"),
        ("ENV A=" + "${A:-" * 40 + "x" + "}" * 40, "nested too deeply"),
    ],
)
def test_env_errors(change: str, fragment: str) -> None:
    with pytest.raises(InvalidChange) as info:
        parse_change(change)
    assert fragment in str(info.value)


_value_chars = st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="\u2028\u2029\x85")


def _double_quote(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$")
    return f'"{escaped}"'


@given(
    st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,10}", fullmatch=True),
    st.text(_value_chars, max_size=30),
)
def test_env_quoting_round_trip(key: str, value: str) -> None:
    assert parse_change(f"ENV {key}={_double_quote(value)}") == ("ENV", [(key, value)])
    if "'" not in value:
        assert parse_change(f"ENV {key}='{value}'") == ("ENV", [(key, value)])
    out = apply_changes({"Env": [f"{key}=old"]}, [f"ENV {key}={_double_quote(value)}"])
    assert out["Env"] == [f"{key}={value}"]


@given(st.text(max_size=40))
def test_arbitrary_change_lines_only_raise_invalid_change(line: str) -> None:
    try:
        apply_changes(base(), [line])
    except InvalidChange as e:
        assert "\n" not in str(e)


# --- LABEL ---------------------------------------------------------------------------------------------------------


def test_labels() -> None:
    out = apply_changes(base(), ['LABEL version=1.0 "com.example.desc"="a thing" maintainer=you'])
    assert out["Labels"] == {"maintainer": "you", "version": "1.0", "com.example.desc": "a thing"}
    assert apply_changes({}, ["label a=b"])["Labels"] == {"a": "b"}
    assert apply_changes({"Labels": None}, ["LABEL a b c"])["Labels"] == {"a": "b c"}
    assert apply_changes({}, ["LABEL 'key with space'=v"])["Labels"] == {"key with space": "v"}
    assert apply_changes({"Env": ["V=9"]}, ["LABEL v=$V"])["Labels"] == {"v": "9"}


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ("LABEL", "needs an argument"),
        ("LABEL =v", "label names"),
        ("LABEL a=1 b", "missing '='"),
        ("LABEL a", "needs a value"),
    ],
)
def test_label_errors(change: str, fragment: str) -> None:
    with pytest.raises(InvalidChange, match="LABEL") as info:
        apply_changes({}, [change])
    assert fragment in str(info.value)


def test_labels_of_wrong_type_in_config() -> None:
    with pytest.raises(InvalidDocument, match="Labels"):
        apply_changes({"Labels": ["a"]}, ["LABEL a=b"])


# --- EXPOSE --------------------------------------------------------------------------------------------------------


def test_expose() -> None:
    out = apply_changes(base(), ["EXPOSE 80 443/tcp 53/udp 8000-8002 9/SCTP 22"])
    assert list(out["ExposedPorts"]) == [
        "22/tcp", "80/tcp", "443/tcp", "53/udp", "8000/tcp", "8001/tcp", "8002/tcp", "9/sctp",
    ]  # fmt: skip
    assert all(v == {} for v in out["ExposedPorts"].values())
    assert apply_changes({}, ["EXPOSE 1-3/udp"])["ExposedPorts"] == {"1/udp": {}, "2/udp": {}, "3/udp": {}}
    assert apply_changes({}, ["EXPOSE 65535"])["ExposedPorts"] == {"65535/tcp": {}}


def test_expose_expands_variables_into_several_ports() -> None:
    out = apply_changes({"Env": ["PORTS=80 81/udp"]}, ["EXPOSE $PORTS 82"])
    assert list(out["ExposedPorts"]) == ["80/tcp", "81/udp", "82/tcp"]


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ("EXPOSE", "needs an argument"),
        ("EXPOSE 0", "out of range"),
        ("EXPOSE 65536", "out of range"),
        ("EXPOSE 1-70000", "out of range"),
        ("EXPOSE 90-80", "end is below the start"),
        ("EXPOSE 80/icmp", "invalid protocol 'icmp'"),
        ("EXPOSE 80/", "invalid port"),
        ("EXPOSE http", "invalid port"),
        ("EXPOSE 127.0.0.1:80:80", "invalid port"),
        ("EXPOSE -1", "invalid port"),
        ("EXPOSE $UNSET", "needs at least one port"),
    ],
)
def test_expose_errors(change: str, fragment: str) -> None:
    with pytest.raises(InvalidChange, match="EXPOSE") as info:
        apply_changes({}, [change])
    assert fragment in str(info.value)


# --- USER ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "user"),
    [("USER app", "app"), ("user 1000:1000", "1000:1000"), ("USER app:wheel", "app:wheel"), ('USER "app"', "app")],
)
def test_user(change: str, user: str) -> None:
    assert apply_changes(base(), [change])["User"] == user


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ("USER", "needs an argument"),
        ("USER a b", "whitespace"),
        ('USER "a\tb"', "whitespace"),
        ("USER a:", "user[:group]"),
        ("USER :g", "user[:group]"),
        ("USER a:b:c", "user[:group]"),
        ("USER ''", "needs a user name"),
    ],
)
def test_user_errors(change: str, fragment: str) -> None:
    with pytest.raises(InvalidChange, match="USER") as info:
        apply_changes({}, [change])
    assert fragment in str(info.value)


# --- WORKDIR ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("current", "changes", "expected"),
    [
        ("/srv", ["WORKDIR /app"], "/app"),
        ("/srv", ["WORKDIR app"], "/srv/app"),
        ("/srv", ["WORKDIR a", "WORKDIR b/c"], "/srv/a/b/c"),
        ("/srv", ["WORKDIR ../etc"], "/etc"),
        ("/srv", ["WORKDIR ../../../.."], "/"),
        ("/srv", ["WORKDIR /a/./b//c/"], "/a/b/c"),
        ("/srv", ["WORKDIR //double"], "/double"),
        (None, ["WORKDIR rel"], "/rel"),
        ("", ["WORKDIR rel"], "/rel"),
        ("/srv", ['WORKDIR "/with space"'], "/with space"),
        ("/srv", ["WORKDIR $HOME/x"], "/root/x"),
    ],
)
def test_workdir(current: str | None, changes: list[str], expected: str) -> None:
    out = apply_changes({"WorkingDir": current, "Env": ["HOME=/root"]}, changes)
    assert out["WorkingDir"] == expected


def test_workdir_errors() -> None:
    with pytest.raises(InvalidChange, match="WORKDIR: needs an argument"):
        apply_changes({}, ["WORKDIR"])
    with pytest.raises(InvalidChange, match="WORKDIR: needs a path"):
        apply_changes({}, ["WORKDIR $UNSET"])
    with pytest.raises(InvalidChange, match="NUL"):
        apply_changes({"Env": ["X=a\0b"]}, ["WORKDIR /$X"])
    with pytest.raises(InvalidDocument, match="WorkingDir"):
        apply_changes({"WorkingDir": 5}, ["WORKDIR x"])


# --- VOLUME ----------------------------------------------------------------------------------------------------------


def test_volume() -> None:
    out = apply_changes(base(), ['VOLUME ["/data", "/var/log"]'])
    assert out["Volumes"] == {"/data": {}, "/var/log": {}}
    out = apply_changes({"Volumes": {"/a": {}}}, ["VOLUME /b   /c", 'volume "/d e"'])
    assert out["Volumes"] == {"/a": {}, "/b": {}, "/c": {}, "/d e": {}}
    # The JSON form is literal: no variable expansion.
    assert apply_changes({"Env": ["D=/x"]}, ['VOLUME ["/$D"]', "VOLUME $D"])["Volumes"] == {"/$D": {}, "/x": {}}


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ("VOLUME", "needs an argument"),
        ("VOLUME []", "needs at least one path"),
        ("VOLUME data", "not absolute"),
        ('VOLUME ["/ok", "rel"]', "not absolute"),
        ('VOLUME ["/ok", 3]', "array of strings"),
        ('VOLUME ["/ok"', "malformed JSON"),
        ('VOLUME ["/a\\u0000b"]', "NUL"),
    ],
)
def test_volume_errors(change: str, fragment: str) -> None:
    with pytest.raises(InvalidChange, match="VOLUME") as info:
        apply_changes({}, [change])
    assert fragment in str(info.value)


# --- STOPSIGNAL ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "signal",
    ["SIGTERM", "TERM", "sigterm", "15", "9", "1", "64", "SIGKILL", "SIGUSR1", "SIGRTMIN", "SIGRTMIN+3",
     "RTMIN+30", "SIGRTMAX", "SIGRTMAX-2", "RTMAX-30", "SIGWINCH", "IOT", "SIGCHLD"],
)  # fmt: skip
def test_stopsignal_accepts(signal: str) -> None:
    assert apply_changes(base(), [f"STOPSIGNAL {signal}"])["StopSignal"] == signal


@pytest.mark.parametrize(
    "signal", ["0", "65", "-1", "SIGFOO", "SIG", "RTMIN+31", "RTMAX-31", "RTMIN-1", "RTMAX+1", "TERM KILL", "1.5"]
)
def test_stopsignal_rejects(signal: str) -> None:
    with pytest.raises(InvalidChange, match="STOPSIGNAL: unknown signal"):
        apply_changes(base(), [f"STOPSIGNAL {signal}"])


# --- unsupported and malformed instructions ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "change",
    ["RUN echo hi", "ADD a /b", "COPY a /b", "FROM scratch", "HEALTHCHECK NONE", "ONBUILD RUN x", "ARG A=1",
     "SHELL [\"/bin/bash\"]", "MAINTAINER me", "BOGUS x", "CMD[\"x\"]"],
)  # fmt: skip
def test_unsupported_instructions(change: str) -> None:
    word = change.split()[0]
    with pytest.raises(InvalidChange) as info:
        apply_changes(base(), [change])
    assert f"{word!r} is not supported" in str(info.value)
    assert isinstance(info.value, ImageError)


@pytest.mark.parametrize("change", ["", "   ", "\t"])
def test_empty_instruction(change: str) -> None:
    with pytest.raises(InvalidChange, match="empty instruction"):
        apply_changes(base(), [change])


@pytest.mark.parametrize("change", ["CMD a\nRUN b", "ENV A=1\rB", "USER a\0"])
def test_multi_line_or_nul_instruction(change: str) -> None:
    with pytest.raises(InvalidChange, match="single line"):
        apply_changes(base(), [change])


def test_non_string_change() -> None:
    with pytest.raises(InvalidChange, match="must be a string"):
        apply_changes(base(), [42])  # type: ignore[list-item]


def test_failure_leaves_input_untouched() -> None:
    config = base()
    before = copy.deepcopy(config)
    with pytest.raises(InvalidChange):
        apply_changes(config, ["ENV A=1", "LABEL b=2", "RUN boom"])
    assert config == before


def test_malformed_env_in_config() -> None:
    with pytest.raises(InvalidDocument, match="Env"):
        apply_changes({"Env": "A=1"}, ["ENV B=2"])


def test_error_message_is_one_line_and_truncated() -> None:
    with pytest.raises(InvalidChange) as info:
        apply_changes({}, ["RUN " + "x" * 500])
    message = str(info.value)
    assert "\n" not in message
    assert len(message) < 250
    assert "'RUN" in message


def test_parse_change_values() -> None:
    assert parse_change('CMD ["a"]') == ("CMD", ["a"])
    assert parse_change("entrypoint run it") == ("ENTRYPOINT", "run it")
    assert parse_change("EXPOSE 80-81/udp") == ("EXPOSE", ["80/udp", "81/udp"])
    assert parse_change("WORKDIR rel/../x") == ("WORKDIR", "rel/../x")
    assert parse_change("VOLUME /a /b") == ("VOLUME", ["/a", "/b"])
    assert parse_change("STOPSIGNAL TERM") == ("STOPSIGNAL", "TERM")
    assert parse_change("USER $U", {"U": "nobody"}) == ("USER", "nobody")
    assert parse_change("LABEL a=b") == ("LABEL", [("a", "b")])
