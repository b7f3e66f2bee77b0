"""Configuration lookup and parsing (lamina.config), on a fake filesystem.

Only pure path/config logic runs here: nothing opens a store.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pyfakefs.fake_filesystem import FakeFilesystem

from lamina import config as cfgmod
from lamina.config import DEFAULT_PRIORITY, Config, Limits, find_config_file, load_config, parse_config
from lamina.errors import ConfigError, LaminaError

SYSTEM = "/etc/lamina/storage.toml"


@pytest.fixture
def env(fs: FakeFilesystem, monkeypatch: pytest.MonkeyPatch) -> FakeFilesystem:
    """A fake filesystem and a clean environment: no config variables, a known HOME."""
    for var in ("LAMINA_CONFIG", "LAMINA_DRIVER", "XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_RUNTIME_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", "/home/user")
    fs.create_dir("/home/user")
    return fs


def write(fs: FakeFilesystem, path: str, text: str) -> str:
    fs.create_file(path, contents=text)
    return path


# -- lookup order -----------------------------------------------------------------------------------------


def test_no_config_anywhere(env: FakeFilesystem) -> None:
    assert find_config_file() is None
    cfg = load_config()
    assert cfg.source is None
    assert cfg.driver is None
    assert cfg.driver_priority == DEFAULT_PRIORITY
    assert cfg.limits == Limits()
    assert cfg.driver_options == {}


def test_user_config_from_xdg_config_home(env: FakeFilesystem, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", "/xdg/cfg")
    write(env, "/xdg/cfg/lamina/storage.toml", '[storage]\nroot = "/from/xdg"\n')
    # a file under ~/.config is not consulted when XDG_CONFIG_HOME is set
    write(env, "/home/user/.config/lamina/storage.toml", '[storage]\nroot = "/from/home"\n')
    assert str(find_config_file()) == "/xdg/cfg/lamina/storage.toml"
    cfg = load_config()
    assert cfg.root == Path("/from/xdg")
    assert cfg.source == Path("/xdg/cfg/lamina/storage.toml")


def test_user_config_defaults_to_home_dot_config(env: FakeFilesystem) -> None:
    write(env, "/home/user/.config/lamina/storage.toml", '[storage]\nroot = "/from/home"\n')
    assert str(find_config_file()) == "/home/user/.config/lamina/storage.toml"
    assert load_config().root == Path("/from/home")


def test_system_config_beats_user_config(env: FakeFilesystem, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", "/xdg/cfg")
    write(env, "/xdg/cfg/lamina/storage.toml", '[storage]\nroot = "/from/xdg"\n')
    write(env, SYSTEM, '[storage]\nroot = "/from/etc"\n')
    assert str(find_config_file()) == SYSTEM
    cfg = load_config()
    assert cfg.root == Path("/from/etc")
    assert str(cfg.source) == SYSTEM


def test_lamina_config_beats_everything(env: FakeFilesystem, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", "/xdg/cfg")
    write(env, "/xdg/cfg/lamina/storage.toml", '[storage]\nroot = "/from/xdg"\n')
    write(env, SYSTEM, '[storage]\nroot = "/from/etc"\n')
    write(env, "/elsewhere/mine.toml", '[storage]\nroot = "/from/env"\n')
    monkeypatch.setenv("LAMINA_CONFIG", "/elsewhere/mine.toml")
    assert str(find_config_file()) == "/elsewhere/mine.toml"
    assert load_config().root == Path("/from/env")


def test_explicit_path_beats_lamina_config(env: FakeFilesystem, monkeypatch: pytest.MonkeyPatch) -> None:
    write(env, "/elsewhere/mine.toml", '[storage]\nroot = "/from/env"\n')
    write(env, "/explicit.toml", '[storage]\nroot = "/from/arg"\n')
    monkeypatch.setenv("LAMINA_CONFIG", "/elsewhere/mine.toml")
    cfg = load_config("/explicit.toml")
    assert cfg.root == Path("/from/arg")
    assert cfg.source == Path("/explicit.toml")


def test_lamina_config_naming_missing_file_is_an_error(env: FakeFilesystem, monkeypatch: pytest.MonkeyPatch) -> None:
    # even though a system config exists, a LAMINA_CONFIG that names nothing must not fall back silently
    write(env, SYSTEM, '[storage]\nroot = "/from/etc"\n')
    monkeypatch.setenv("LAMINA_CONFIG", "/nope/storage.toml")
    with pytest.raises(ConfigError) as ei:
        find_config_file()
    assert "/nope/storage.toml" in ei.value.message
    with pytest.raises(ConfigError):
        load_config()


def test_lamina_config_naming_a_directory_is_an_error(env: FakeFilesystem, monkeypatch: pytest.MonkeyPatch) -> None:
    env.create_dir("/a/dir")
    monkeypatch.setenv("LAMINA_CONFIG", "/a/dir")
    with pytest.raises(ConfigError, match="/a/dir"):
        load_config()


def test_empty_lamina_config_is_ignored(env: FakeFilesystem, monkeypatch: pytest.MonkeyPatch) -> None:
    write(env, SYSTEM, '[storage]\nroot = "/from/etc"\n')
    monkeypatch.setenv("LAMINA_CONFIG", "")
    assert str(find_config_file()) == SYSTEM


def test_explicit_path_missing_is_a_config_error(env: FakeFilesystem) -> None:
    with pytest.raises(ConfigError, match=r"/missing\.toml"):
        load_config("/missing.toml")


def test_undecodable_file_is_a_config_error(env: FakeFilesystem) -> None:
    env.create_file("/bad.toml", contents=b"[storage]\nroot = \"\xff\xfe\"\n")
    with pytest.raises(ConfigError, match=r"/bad\.toml"):
        load_config("/bad.toml")


# -- precedence of driver, root and runroot ---------------------------------------------------------------


def test_driver_precedence(env: FakeFilesystem, monkeypatch: pytest.MonkeyPatch) -> None:
    write(env, "/c.toml", '[storage]\ndriver = "from-file"\n')
    assert load_config("/c.toml").driver == "from-file"
    monkeypatch.setenv("LAMINA_DRIVER", "from-env")
    assert load_config("/c.toml").driver == "from-env"
    assert load_config("/c.toml", driver="from-flag").driver == "from-flag"
    monkeypatch.setenv("LAMINA_DRIVER", "")
    assert load_config("/c.toml").driver == "from-file"


def test_empty_driver_in_file_means_unset(env: FakeFilesystem, monkeypatch: pytest.MonkeyPatch) -> None:
    write(env, "/c.toml", '[storage]\ndriver = ""\n')
    assert load_config("/c.toml").driver is None
    monkeypatch.setenv("LAMINA_DRIVER", "vfs")
    assert load_config("/c.toml").driver == "vfs"


def test_root_and_runroot_overrides_beat_file(env: FakeFilesystem) -> None:
    write(env, "/c.toml", '[storage]\nroot = "/file/root"\nrunroot = "/file/run"\n')
    cfg = load_config("/c.toml")
    assert (cfg.root, cfg.runroot) == (Path("/file/root"), Path("/file/run"))
    cfg = load_config("/c.toml", root="/flag/root", runroot="/flag/run")
    assert (cfg.root, cfg.runroot) == (Path("/flag/root"), Path("/flag/run"))
    cfg = load_config("/c.toml", root="/flag/root")
    assert (cfg.root, cfg.runroot) == (Path("/flag/root"), Path("/file/run"))


def test_relative_paths_are_made_absolute(env: FakeFilesystem) -> None:
    env.create_dir("/work/here")
    os.chdir("/work/here")
    write(env, "/c.toml", '[storage]\nroot = "rel/root"\n')
    cfg = load_config("/c.toml", runroot="rel/run")
    assert cfg.root == Path("/work/here/rel/root")
    assert cfg.runroot == Path("/work/here/rel/run")
    assert cfg.root.is_absolute() and cfg.runroot.is_absolute()


# -- defaults ----------------------------------------------------------------------------------------------


def test_defaults_as_root(env: FakeFilesystem, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setenv("XDG_DATA_HOME", "/xdg/data")  # ignored for root
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/xdg/run")
    cfg = load_config()
    assert cfg.root == Path("/var/lib/lamina")
    assert cfg.runroot == Path("/run/lamina")


def test_defaults_as_user_with_xdg_dirs(env: FakeFilesystem, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1234)
    monkeypatch.setenv("XDG_DATA_HOME", "/xdg/data")
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/xdg/run")
    cfg = load_config()
    assert cfg.root == Path("/xdg/data/lamina/storage")
    assert cfg.runroot == Path("/xdg/run/lamina")


def test_defaults_as_user_without_xdg_dirs(env: FakeFilesystem, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1234)
    cfg = load_config()
    assert cfg.root == Path("/home/user/.local/share/lamina/storage")
    assert cfg.runroot == Path("/tmp/lamina-run-1234")
    assert not str(cfg.root).startswith("/var/lib")


def test_file_values_beat_defaults(env: FakeFilesystem, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    write(env, "/c.toml", '[storage]\nroot = "/srv/lamina"\n')
    cfg = load_config("/c.toml")
    assert cfg.root == Path("/srv/lamina")
    assert cfg.runroot == Path("/run/lamina")


# -- full parse --------------------------------------------------------------------------------------------


FULL = """
[storage]
driver = "vfs"
root = "/srv/store"
runroot = "/run/store"
driver_priority = ["tarball", "vfs"]

[storage.limits]
max_layer_bytes = 1048576
max_layer_entries = 42

[storage.options.vfs]
copy = "auto"
depth = 3

[storage.options.thirdparty]
flag = true
"""


def test_full_file(env: FakeFilesystem) -> None:
    write(env, "/full.toml", FULL)
    cfg = load_config("/full.toml")
    assert cfg == Config(
        root=Path("/srv/store"),
        runroot=Path("/run/store"),
        driver="vfs",
        driver_priority=("tarball", "vfs"),
        driver_options={"vfs": {"copy": "auto", "depth": 3}, "thirdparty": {"flag": True}},
        limits=Limits(max_layer_bytes=1048576, max_layer_entries=42),
        source=Path("/full.toml"),
    )


def test_options_for_reaches_driver_tables(env: FakeFilesystem) -> None:
    write(env, "/full.toml", FULL)
    cfg = load_config("/full.toml")
    assert cfg.options_for("vfs") == {"copy": "auto", "depth": 3}
    assert cfg.options_for("thirdparty") == {"flag": True}
    assert cfg.options_for("tarball") == {}
    # a copy: a driver mutating its options cannot change the configuration
    cfg.options_for("vfs")["copy"] = "changed"
    assert cfg.options_for("vfs")["copy"] == "auto"


def test_partial_limits_keep_other_default(env: FakeFilesystem) -> None:
    write(env, "/c.toml", "[storage.limits]\nmax_layer_entries = 5\n")
    cfg = load_config("/c.toml")
    assert cfg.limits.max_layer_entries == 5
    assert cfg.limits.max_layer_bytes == Limits().max_layer_bytes


def test_file_without_storage_table(env: FakeFilesystem) -> None:
    write(env, "/c.toml", "")
    cfg = load_config("/c.toml")
    assert cfg.source == Path("/c.toml")
    assert cfg.driver_priority == DEFAULT_PRIORITY


# -- errors ------------------------------------------------------------------------------------------------


def _config_error(env: FakeFilesystem, text: str) -> ConfigError:
    path = "/etc/lamina/bad.toml"
    env.create_file(path, contents=text)
    with pytest.raises(ConfigError) as ei:
        load_config(path)
    msg = ei.value.message
    assert "\n" not in msg and "\n" not in str(ei.value)
    assert msg.strip() == msg and msg
    return ei.value


@pytest.mark.parametrize(
    "text",
    [
        "[storage\nroot = 1",
        "[storage]\nroot = ",
        "[storage]\nroot = '/a'\nroot = '/b'\n",
        "storage = \"\"\"\nmulti\nline\n",
    ],
    ids=["unclosed-table", "missing-value", "duplicate-key", "unterminated-string"],
)
def test_bad_toml(env: FakeFilesystem, text: str) -> None:
    err = _config_error(env, text)
    assert "/etc/lamina/bad.toml" in err.message
    assert "invalid TOML" in err.message


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('[storage]\ndrvier = "vfs"\n', "drvier"),
        ("[storage]\nroot = '/r'\ngraphroot = '/g'\n", "graphroot"),
        ("[storage.limits]\nmax_layer_size = 5\n", "max_layer_size"),
        ("[storage.options]\n[storage.foo]\nx = 1\n", "foo"),
    ],
    ids=["storage-typo", "storage-extra", "limits-typo", "storage-subtable"],
)
def test_unknown_keys(env: FakeFilesystem, text: str, key: str) -> None:
    err = _config_error(env, text)
    assert key in err.message
    assert "unknown" in err.message


def test_unknown_top_level_table(env: FakeFilesystem) -> None:
    # a misspelt [storage] table must not be silently ignored (every setting would fall back to defaults)
    err = _config_error(env, '[storgae]\ndriver = "vfs"\nroot = "/srv"\n')
    assert "storgae" in err.message


@pytest.mark.parametrize(
    ("text", "what"),
    [
        ("storage = 5\n", "[storage]"),
        ("[storage]\ndriver = 5\n", "storage.driver"),
        ("[storage]\ndriver = false\n", "storage.driver"),
        ("[storage]\nroot = 5\n", "storage.root"),
        ("[storage]\nroot = ['/a']\n", "storage.root"),
        ("[storage]\nrunroot = {a = 1}\n", "storage.runroot"),
        ("[storage]\ndriver_priority = 'vfs'\n", "storage.driver_priority"),
        ("[storage]\ndriver_priority = ['vfs', 3]\n", "storage.driver_priority entry"),
        ("[storage]\noptions = 5\n", "[storage.options]"),
        ("[storage]\noptions = {vfs = 5}\n", "[storage.options.vfs]"),
        ("[storage]\nlimits = 5\n", "[storage.limits]"),
    ],
)
def test_wrong_types(env: FakeFilesystem, text: str, what: str) -> None:
    err = _config_error(env, text)
    assert what in err.message
    assert "/etc/lamina/bad.toml" in err.message


@pytest.mark.parametrize(
    "value",
    ["0", "-1", "-9223372036854775808", "1.5", "'10'", "true", "false", "[1]"],
)
@pytest.mark.parametrize("key", ["max_layer_bytes", "max_layer_entries"])
def test_non_positive_or_non_integer_limits(env: FakeFilesystem, key: str, value: str) -> None:
    err = _config_error(env, f"[storage.limits]\n{key} = {value}\n")
    assert "positive" in err.message
    assert "/etc/lamina/bad.toml" in err.message


def test_smallest_positive_limit_is_accepted(env: FakeFilesystem) -> None:
    write(env, "/c.toml", "[storage.limits]\nmax_layer_bytes = 1\nmax_layer_entries = 1\n")
    assert load_config("/c.toml").limits == Limits(1, 1)


def test_config_errors_are_lamina_errors(env: FakeFilesystem) -> None:
    err = _config_error(env, "[storage]\nroot = 5\n")
    assert isinstance(err, LaminaError)


def test_parse_config_returns_storage_table() -> None:
    assert parse_config('[storage]\ndriver = "vfs"\n') == {"driver": "vfs"}
    with pytest.raises(ConfigError, match=r"^configuration: "):
        parse_config("[storage]\nbogus = 1\n")
    with pytest.raises(ConfigError, match=r"^/x\.toml: "):
        parse_config("not toml at all", Path("/x.toml"))


def test_system_config_constant() -> None:
    # the documented system location
    assert str(cfgmod.SYSTEM_CONFIG) == "/etc/lamina/storage.toml"


def test_images_and_containers_tables(env: FakeFilesystem) -> None:
    env.create_file("/etc/lamina/storage.toml", contents='[images]\nkeep_layer_blobs = false\n'
                    '[containers]\nruntime = "crun"\n')
    cfg = load_config()
    assert cfg.keep_layer_blobs is False and cfg.runtime == "crun"
    defaults = Config(root=Path("/r"), runroot=Path("/rr"))
    assert defaults.keep_layer_blobs is True and defaults.runtime == "runc"


@pytest.mark.parametrize("text, needle", [
    ("[images]\nkeep_layer_blobs = 'no'\n", "keep_layer_blobs"),
    ("[images]\ncompress = true\n", "unknown key"),
    ("[containers]\nruntime = 3\n", "containers.runtime"),
    ("[containers]\nruntime = ''\n", "must not be empty"),
    ("[containers]\nhooks = []\n", "unknown key"),
    ("[registries]\n", "unknown table"),
])
def test_images_and_containers_tables_are_validated(env: FakeFilesystem, text: str, needle: str) -> None:
    env.create_file("/etc/lamina/storage.toml", contents=text)
    with pytest.raises(ConfigError, match=needle):
        load_config()


def test_registry_settings(env: FakeFilesystem) -> None:
    env.create_file("/etc/lamina/storage.toml", contents='[images]\nregistries = ["127.0.0.1:5000", "quay.io"]\n'
                    'insecure_registries = ["10.0.0.0/8", "reg.example:5000"]\nmax_concurrent_downloads = 2\n'
                    'max_download_attempts = 9\nallow_foreign_urls = true\n')
    r = load_config().registry
    assert r.registries == ("127.0.0.1:5000", "quay.io") and r.insecure_registries == ("10.0.0.0/8", "reg.example:5000")
    assert (r.max_concurrent_downloads, r.max_concurrent_uploads, r.max_download_attempts) == (2, 5, 9)
    assert r.allow_foreign_urls is True
    assert Config(root=Path("/r"), runroot=Path("/rr")).registry.registries == ("docker.io",)


@pytest.mark.parametrize("text", [
    "[images]\nregistries = 'docker.io'\n",
    "[images]\nregistries = ['docker.io/library']\n",
    "[images]\nmax_concurrent_downloads = 0\n",
    "[images]\nmax_download_attempts = true\n",
    "[images]\ninsecure_registries = [1]\n",
])
def test_registry_settings_are_validated(env: FakeFilesystem, text: str) -> None:
    env.create_file("/etc/lamina/storage.toml", contents=text)
    with pytest.raises(ConfigError):
        load_config()
