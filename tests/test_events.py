"""Events and per-operation metrics.

``lamina events`` in one process follows what other processes do to the store (real subprocesses, real
images by umoci and skopeo, a real registry); ``--since``/``--until`` and ``--filter`` pick from the log, the
log keeps its newest rows only, a read-only store records nothing, an event that cannot be written does not
fail its action, and ``lamina info --format prometheus`` is well-formed exposition text whose counts follow
the actions.
"""

from __future__ import annotations

import json
import queue
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from fault_fixtures import loop_ext4, random_rootfs, remount
from registry_fixtures import Registry

from conftest import lamina_cli
from image_fixtures import ImageFacts, SkopeoImages
from lamina import ImageService
from lamina.config import Config
from lamina.errors import LaminaError
from lamina.store.events import TRIM_EVERY


def _cmd(store: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "lamina", "--root", str(store / "root"), "--runroot", str(store / "run"), *args]


class Follower:
    """``lamina events --format json`` running in its own process; its events as they arrive."""

    def __init__(self, store: Path, *args: str) -> None:
        self.proc = subprocess.Popen(_cmd(store, "events", "--format", "json", *args), stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE)
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.events.put(json.loads(line))

    def next(self, timeout: float = 10.0) -> dict[str, Any] | None:
        try:
            return self.events.get(timeout=timeout)
        except queue.Empty:
            return None

    def stop(self) -> tuple[int, str, list[dict[str, Any]]]:
        """Interrupt it (Ctrl-C); its status, stderr and the events it printed that were not taken yet."""
        self.proc.send_signal(signal.SIGINT)
        code = self.proc.wait(timeout=30)
        self.reader.join(timeout=10)
        assert self.proc.stderr is not None
        rest = []
        while not self.events.empty():
            rest.append(self.events.get())
        return code, self.proc.stderr.read().decode(), rest


def _brief(ev: dict[str, Any]) -> tuple[str, str, str]:
    return ev["Type"], ev["Action"], ev["Actor"]["Attributes"].get("name", "")


def test_a_follower_sees_what_other_processes_do_in_order(
    tmp_path: Path, umoci_small_image: ImageFacts, skopeo_images: SkopeoImages, registry: Registry
) -> None:
    store = tmp_path / "s"
    lamina_cli("--driver", "vfs", "load", "-q", "-i", str(umoci_small_image.path), root=store)
    image_id = json.loads(lamina_cli("inspect", "small:1", root=store).stdout)[0]["Id"]
    follower = Follower(store)
    try:
        # Without --since only new events show: the load above does not. The follower is ready once it shows
        # a tag done after it started.
        deadline = time.monotonic() + 60
        first = None
        while first is None:
            assert time.monotonic() < deadline, "the follower showed nothing"
            lamina_cli("tag", "small:1", "ready:1", root=store)
            first = follower.next(timeout=0.5)
        assert _brief(first) == ("image", "tag", "ready:1")
        lamina_cli("untag", "small:1", "ready:1", root=store)
        while (ev := follower.next()) is not None and _brief(ev) == ("image", "tag", "ready:1"):
            pass  # tags done before the first one arrived
        assert ev is not None and _brief(ev) == ("image", "untag", "ready:1")
        ev = follower.next()  # the repository's digest name goes with its last tag
        assert ev is not None and ev["Action"] == "untag" and ev["Actor"]["Attributes"]["name"].startswith("ready@")

        remote = f"{registry.host}/events/small:1"
        lamina_cli("load", "-q", "-i", str(skopeo_images.docker_archive.path), root=store)
        lamina_cli("tag", "small:1", "example.com/extra:1", root=store)
        cid = lamina_cli("create", "--name", "box", "small:1", root=store).stdout.decode().strip()
        lamina_cli("mount", "box", root=store)
        lamina_cli("umount", "box", root=store)
        lamina_cli("rm", "box", root=store)
        lamina_cli("untag", "small:1", "example.com/extra:1", root=store)
        lamina_cli("save", "-o", str(tmp_path / "out.tar"), "small:1", root=store)
        lamina_cli("push", "small:1", remote, root=store)
        lamina_cli("rmi", "example.com/small:1", root=store)
        lamina_cli("pull", remote, root=store)
        lamina_cli("rmi", "--force", image_id, root=store)
        seen = []
        while (ev := follower.next(timeout=3)) is not None:
            seen.append(ev)
    finally:
        code, err, rest = follower.stop()
    assert code == 0 and err == ""
    seen += rest
    digest = seen[-2]["Actor"]["Attributes"]["name"].partition("@")[2]
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", digest)
    # a repository's last tag takes its digest name with it (the docker-archive gave example.com/small none)
    assert [_brief(ev) for ev in seen[:12]] == [
        ("image", "load", "example.com/small:1"),
        ("image", "tag", "example.com/extra:1"),
        ("container", "create", "box"),
        ("container", "mount", "box"),
        ("container", "unmount", "box"),
        ("container", "remove", "box"),
        ("image", "untag", "example.com/extra:1"),
        ("image", "untag", f"example.com/extra@{digest}"),
        ("image", "save", "small:1"),
        ("image", "push", remote),
        ("image", "untag", "example.com/small:1"),
        ("image", "pull", remote),
    ]
    # rmi by ID: every name, then the image
    assert sorted(_brief(ev) for ev in seen[12:-1]) == sorted([
        ("image", "untag", f"{registry.host}/events/small@{digest}"),
        ("image", "untag", remote),
        ("image", "untag", "small:1"),
        ("image", "untag", f"small@{digest}"),
    ])
    assert _brief(seen[-1]) == ("image", "delete", "")
    box = {"image": "small:1", "imageID": image_id, "name": "box"}
    for ev in seen:
        assert ev["Actor"]["ID"] == (cid if ev["Type"] == "container" else image_id), ev
        if ev["Type"] == "container":
            assert ev["Actor"]["Attributes"] == box
    times = [ev["timeNano"] for ev in seen]
    assert times == sorted(times) and all(ev["time"] == ev["timeNano"] // 10**9 for ev in seen)
    assert seen[9]["Actor"]["Attributes"]["digest"] == digest  # the push names the manifest it pushed


@pytest.fixture
def two_images(tmp_path: Path) -> tuple[Path, Path]:
    return (random_rootfs(tmp_path / "a.tar", "a", 1000, 1), random_rootfs(tmp_path / "b.tar", "b", 1000, 2))


def _svc(tmp_path: Path, **config: Any) -> ImageService:
    return ImageService.open(Config(root=tmp_path / "s" / "root", runroot=tmp_path / "s" / "run", driver="vfs",
                                    **config))


def test_since_until_and_filters(tmp_path: Path, two_images: tuple[Path, Path]) -> None:
    with _svc(tmp_path) as svc:
        with open(two_images[0], "rb") as f:
            a = svc.import_image(f, "example.com/a:1")
        svc.tag_image(a.id, "a:2")
        c = svc.create_container("a:2", name="box")
        time.sleep(0.05)
        middle = time.time()
        time.sleep(0.05)
        with open(two_images[1], "rb") as f:
            b = svc.import_image(f, "b:1")
        svc.remove_container("box")
        svc.image_delete("b:1")
        end = time.time()

        def seen(**kw: Any) -> list[tuple[str, str, str, str]]:
            return [(e.type, e.action, e.id, e.name) for e in svc.events(**kw)]

        everything = seen()
        assert everything == [
            ("image", "import", a.id, "example.com/a:1"),
            ("image", "tag", a.id, "a:2"),
            ("container", "create", c.id, "box"),
            ("image", "import", b.id, "b:1"),
            ("container", "remove", c.id, "box"),
            ("image", "untag", b.id, "b:1"),
            ("image", "delete", b.id, ""),
        ]
        assert seen(since=0) == everything == seen(since="1h") == seen(since="1h30m", until=str(end + 1))
        assert seen(until=middle) == everything[:3] == seen(until=str(middle)) == seen(since="1h", until=middle)
        assert seen(since=middle) == everything[3:] == seen(since=f"{middle:.9f}")
        rfc3339 = datetime.fromtimestamp(middle, UTC).isoformat().replace("+00:00", "Z")
        assert seen(since=rfc3339) == everything[3:]
        assert seen(until="1h") == [] == seen(since=end + 1) == seen(since=rfc3339, until="1h")
        # follow with --until: what is there, then waits until that time has passed
        t0 = time.monotonic()
        assert [e.action for e in svc.events(since=middle, until=time.time() + 0.6, follow=True)] == [
            "import", "remove", "untag", "delete"]
        assert time.monotonic() - t0 >= 0.5
        # filters: one key's values are alternatives, different keys must all match
        assert seen(filters={"type": ["container"]}) == [everything[2], everything[4]]
        assert seen(filters=["type=image", "event=tag", "event=delete"]) == [everything[1], everything[6]]
        # a container's image is named by the image's first name
        assert seen(filters=["image=a"]) == [everything[1]] == seen(filters=["image=docker.io/library/a:2"])
        assert seen(filters=["image=example.com/a"]) == [everything[0], everything[2], everything[4]]
        assert seen(filters=[f"image={b.id}"]) == everything[3:4] + everything[5:]
        assert seen(filters=[f"image={b.id.split(':')[1][:12]}", "event=delete"]) == [everything[6]]
        assert seen(filters=["container=box"]) == seen(filters=[f"container={c.id[:5]}"]) == [everything[2],
                                                                                              everything[4]]
        assert seen(filters=["container=box", "event=remove"]) == [everything[4]]
        for bad in (["type=volume"], ["color=red"], ["image"]):
            with pytest.raises(LaminaError, match="invalid"):
                seen(filters=bad)
        with pytest.raises(LaminaError, match="invalid time"):
            seen(since="yesterday")

    # the CLI: the same picks; lines of TIME TYPE ACTION ID NAME (ATTRIBUTES)
    store = tmp_path / "s"
    out = lamina_cli("events", "--since", "1h", "--until", str(end), "-f", "type=container", root=store)
    lines = out.stdout.decode().splitlines()
    assert [ln.split(" ", 4)[1:] for ln in lines] == [
        ["container", "create", c.id, f"box (image=example.com/a:1, imageID={a.id})"],
        ["container", "remove", c.id, f"box (image=example.com/a:1, imageID={a.id})"],
    ]
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z", ln.split(" ")[0]) for ln in lines)
    out = lamina_cli("events", "--format", "json", "--until", "0s", "--filter", "event=delete", root=store)
    [ev] = [json.loads(ln) for ln in out.stdout.decode().splitlines()]
    assert ev["Type"] == "image" and ev["Actor"] == {"ID": b.id, "Attributes": {}} and ev["scope"] == "local"
    for args in (["--since", "soon"], ["--filter", "type=volume"], ["-f", "nope"]):
        proc = lamina_cli("events", *args, root=store, check=False)
        assert proc.returncode == 1 and proc.stderr.decode().startswith("Error: invalid"), proc.stderr
        assert proc.stderr.decode().count("\n") == 1


def test_follow_in_process_sees_own_and_other_processes_events(tmp_path: Path, two_images: tuple[Path, Path]) -> None:
    """A follower through the API sees the actions of its own process (which SQLite's data_version does not
    count) and of another one."""
    with _svc(tmp_path) as svc:
        got: list[str] = []
        with open(two_images[0], "rb") as f:
            svc.import_image(f, "a:1")  # before it follows: not seen
        stream = svc.events(follow=True)

        def follow() -> None:
            for ev in stream:
                got.append(ev.name)
                if len(got) == 2:
                    return

        follower = threading.Thread(target=follow, daemon=True)
        follower.start()
        time.sleep(0.5)
        svc.tag_image("a:1", "mine:1")
        lamina_cli("tag", "a:1", "theirs:1", root=tmp_path / "s")
        follower.join(timeout=10)
        assert got == ["mine:1", "theirs:1"]


def test_the_log_keeps_the_newest_events(tmp_path: Path, two_images: tuple[Path, Path]) -> None:
    keep = 150
    with _svc(tmp_path, max_events=keep) as svc:
        with open(two_images[0], "rb") as f:
            svc.import_image(f, "a:1")
        for i in range(2 * keep + 30):
            svc.tag_image("a:1", f"a:t{i}")
        names = [e.name for e in svc.events()]
    total = 2 * keep + 31
    assert keep <= len(names) < keep + TRIM_EVERY
    assert names == ["a:1", *[f"a:t{i}" for i in range(2 * keep + 30)]][total - len(names):]
    db = sqlite3.connect(tmp_path / "s" / "run" / "mounts.db")
    try:
        assert db.execute("SELECT COUNT(*), MAX(seq) FROM events").fetchone() == (len(names), total)
    finally:
        db.close()


def test_a_failed_event_write_does_not_fail_the_action(tmp_path: Path, two_images: tuple[Path, Path]) -> None:
    store = tmp_path / "s"
    with _svc(tmp_path) as svc, open(two_images[0], "rb") as f:
        svc.import_image(f, "a:1")
    db = sqlite3.connect(store / "run" / "mounts.db")
    db.execute("CREATE TRIGGER no_events BEFORE INSERT ON events BEGIN SELECT RAISE(ABORT, 'refused'); END")
    db.commit()
    db.close()
    lamina_cli("tag", "a:1", "b:1", root=store)
    assert set(json.loads(lamina_cli("inspect", "b:1", root=store).stdout)[0]["RepoTags"]) == {"a:1", "b:1"}
    out = lamina_cli("events", "--format", "json", "--since", "1h", "--until", "0s", root=store).stdout
    assert [json.loads(ln)["Action"] for ln in out.splitlines()] == ["import"]


def test_a_read_only_store_records_nothing(tmp_path: Path, two_images: tuple[Path, Path]) -> None:
    """A store whose filesystem is read-only records nothing (a save still works), nor does a run root that
    takes no writes (a tag in the store beside it still works)."""
    with loop_ext4(tmp_path, 16) as disk:
        ro_store = (disk / "root", tmp_path / "run")  # the store read-only, its run root writable
        ro_run = (tmp_path / "root", disk / "run")  # the run root read-only
        old_run = (tmp_path / "root3", disk / "run3")  # the same, made by a lamina without the event log

        def cli(where: tuple[Path, Path], *args: str) -> bytes:
            proc = subprocess.run(
                [sys.executable, "-m", "lamina", "--root", str(where[0]), "--runroot", str(where[1]), *args],
                capture_output=True, timeout=120)
            assert proc.returncode == 0, (args, proc.stderr)
            return proc.stdout

        def actions(where: tuple[Path, Path]) -> list[str]:
            out = cli(where, "events", "--format", "json", "--since", "1h", "--until", "0s")
            return [json.loads(ln)["Action"] for ln in out.splitlines()]

        cli(ro_store, "--driver", "vfs", "import", str(two_images[0]), "a:1")
        cli(ro_run, "--driver", "vfs", "import", str(two_images[1]), "b:1")
        cli(old_run, "--driver", "vfs", "import", str(two_images[1]), "b:1")
        db = sqlite3.connect(old_run[1] / "mounts.db")
        db.execute("DROP TABLE events")
        db.commit()
        db.close()
        remount(disk, read_only=True)
        try:
            cli(ro_store, "save", "-o", str(tmp_path / "a.tar"), "a:1")
            assert (tmp_path / "a.tar").stat().st_size > 1000
            assert actions(ro_store) == ["import"]
            cli(ro_run, "tag", "b:1", "c:1")
            assert b"c" in cli(ro_run, "images")
            assert actions(ro_run) == ["import"]
            cli(old_run, "tag", "b:1", "c:1")
            assert actions(old_run) == []
        finally:
            remount(disk, read_only=False)
        assert actions(ro_run) == ["import"]
        cli(ro_run, "tag", "b:1", "d:1")
        assert actions(ro_run) == ["import", "tag"]
        cli(old_run, "tag", "b:1", "d:1")  # a writable run root gets the table when the store opens
        assert actions(old_run) == ["tag"]


def test_layer_container_commit_and_squash_events(tmp_path: Path, two_images: tuple[Path, Path]) -> None:
    with _svc(tmp_path) as svc:
        with open(two_images[0], "rb") as f:
            layer = svc.register_layer(f)
        svc.mount_layer(layer.chain_id)
        svc.unmount_layer(layer.chain_id)
        assert svc.release_layer(layer.chain_id) == [layer.chain_id]
        with open(two_images[1], "rb") as f:
            base = svc.import_image(f, "base:1")
        c = svc.create_container("base:1", name="box")
        with svc.perform_with_base_fs("box") as rootfs:
            Path(rootfs, "new").write_text("x")
        committed = svc.commit_image("box", "committed:1", message="m")
        squashed = svc.squash_image("committed:1")
        got = [(e.type, e.action, e.id, e.name, e.attributes) for e in svc.events()]
    ref = {"image": "base:1", "imageID": base.id}
    assert got == [
        ("layer", "create", layer.chain_id, "", {}),
        ("layer", "mount", layer.chain_id, "", {}),
        ("layer", "unmount", layer.chain_id, "", {}),
        ("layer", "remove", layer.chain_id, "", {}),
        ("image", "import", base.id, "base:1", {}),
        ("container", "create", c.id, "box", ref),
        ("container", "commit", c.id, "box", {**ref, "committedID": committed.id, "imageRef": "committed:1"}),
        ("image", "squash", squashed.id, "", {"source": committed.id}),
    ]


def test_prune_events(tmp_path: Path, two_images: tuple[Path, Path]) -> None:
    with _svc(tmp_path) as svc:
        with open(two_images[0], "rb") as f:
            dangling = svc.import_image(f)
        with open(two_images[1], "rb") as f:
            kept = svc.import_image(f, "b:1")
        c = svc.create_container("b:1", name="box")
        start = time.time()
        report = svc.images_prune()
        assert report.deleted == [{"Deleted": dangling.id}]
        system = svc.system_prune(all=True)
        assert system["ContainersDeleted"] == [c.id]
        got = [(e.type, e.action, e.id, e.name, e.attributes) for e in svc.events(since=start)]
        timings = svc.recorded_timings()
    assert got == [
        ("image", "delete", dangling.id, "", {}),
        ("image", "prune", "", "", {"reclaimed": str(report.reclaimed)}),
        ("container", "remove", c.id, "box", {"image": "b:1", "imageID": kept.id}),
        ("image", "untag", kept.id, "b:1", {}),
        ("image", "delete", kept.id, "", {}),
        ("image", "prune", "", "", {"reclaimed": got[-1][4]["reclaimed"]}),
    ]
    assert int(got[-1][4]["reclaimed"]) > 0
    assert timings["image.prune"]["calls"] == 2 and timings["system.prune"]["calls"] == 1


def test_run_start_and_exit(tmp_path: Path, debian_image_docker_archive: ImageFacts) -> None:
    from lamina.testing import require_root, require_tool

    require_root()
    require_tool("runc")
    with ImageService.open(root=tmp_path / "root", runroot=tmp_path / "run", driver="overlay") as svc:
        [loaded] = svc.load_image(debian_image_docker_archive.path)
        c, code = svc.run_container("example.com/debian:bookworm", ["sh", "-c", "exit 3"], name="r", remove=True)
        assert code == 3
        got = [(e.type, e.action, e.id, e.name, e.attributes.get("exitCode")) for e in svc.events()]
        timings = svc.recorded_timings()
    assert got == [
        ("image", "load", loaded.image.id, "example.com/debian:bookworm", None),
        ("container", "create", c.id, "r", None),
        ("container", "start", c.id, "r", None),
        ("container", "exit", c.id, "r", "3"),
        ("container", "remove", c.id, "r", None),
    ]
    assert timings["container.run"]["calls"] == 1 and timings["container.create"]["calls"] == 1
    assert timings["container.run"]["total_ms"] >= timings["container.create"]["total_ms"]


# Prometheus' text exposition format, line by line: comments, then samples.
_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_VALUE = r"[-+]?(?:\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?|Inf|NaN)"
_LABEL = r'[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*"'
_SAMPLE = re.compile(rf"({_NAME})(\{{(?:{_LABEL}(?:,{_LABEL})*)?\}})? ({_VALUE})")
_HELP = re.compile(rf"# HELP ({_NAME}) (.*)")
_TYPE = re.compile(rf"# TYPE ({_NAME}) (counter|gauge|histogram|summary|untyped)")


def parse_exposition(text: str) -> dict[str, tuple[str, dict[str, float]]]:
    """``{family: (type, {labels: value})}``; fails on any line the format does not allow, a family typed twice
    or after its samples, samples of a family not next to each other, or a counter not named ``*_total``."""
    assert text.endswith("\n")
    families: dict[str, tuple[str, dict[str, float]]] = {}
    helped: set[str] = set()
    current = None
    for line in text[:-1].split("\n"):
        if m := _HELP.fullmatch(line):
            assert m[1] not in helped, line
            helped.add(m[1])
        elif m := _TYPE.fullmatch(line):
            assert m[1] not in families, line
            families[m[1]] = (m[2], {})
            current = m[1]
            if m[2] == "counter":
                assert m[1].endswith("_total"), line
        elif m := _SAMPLE.fullmatch(line):
            assert m[1] == current, f"{line!r}: a sample outside its family's block"
            labels = m[2] or ""
            assert labels not in families[current][1], line
            families[current][1][labels] = float(m[3])
        else:
            raise AssertionError(f"not exposition format: {line!r}")
    assert helped == set(families)
    return families


def test_info_prometheus(tmp_path: Path, two_images: tuple[Path, Path]) -> None:
    store = tmp_path / "s"
    lamina_cli("--driver", "vfs", "import", str(two_images[0]), "a:1", root=store)

    def metrics() -> dict[str, tuple[str, dict[str, float]]]:
        return parse_exposition(lamina_cli("info", "--format", "prometheus", root=store).stdout.decode())

    before = metrics()
    assert before["lamina_images"] == ("gauge", {"": 1.0}) and before["lamina_containers"] == ("gauge", {"": 0.0})
    assert before["lamina_layers"] == ("gauge", {"": 1.0}) and before["lamina_disk_bytes"][1][""] > 1000
    assert before["lamina_operation_calls_total"] == ("counter", {'{op="image.import"}': 1.0})
    assert before["lamina_driver_hook_calls_total"][1]['{hook="lamina_apply_diff"}'] == 1.0
    assert before["lamina_info"][1] == {f'{{version="{__import__("lamina").__version__}",driver="vfs",'
                                        f'root="{store / "root"}"}}': 1.0}
    lamina_cli("tag", "a:1", "b:1", root=store)
    lamina_cli("import", str(two_images[1]), "c:1", root=store)
    lamina_cli("create", "a:1", root=store)
    assert lamina_cli("tag", "nosuch:1", "d:1", root=store, check=False).returncode == 1
    after = metrics()
    calls = after["lamina_operation_calls_total"][1]
    assert calls == {'{op="image.import"}': 2.0, '{op="image.tag"}': 2.0, '{op="container.create"}': 1.0}
    assert after["lamina_operation_errors_total"][1]['{op="image.tag"}'] == 1.0
    assert after["lamina_operation_errors_total"][1]['{op="image.import"}'] == 0.0
    seconds = after["lamina_operation_seconds_total"][1]
    assert 0 < after["lamina_operation_max_seconds"][1]['{op="image.import"}'] <= seconds['{op="image.import"}']
    assert after["lamina_operation_seconds_total"][0] == "counter"
    assert after["lamina_operation_max_seconds"][0] == "gauge"
    assert after["lamina_images"][1] == {"": 2.0} and after["lamina_containers"][1] == {"": 1.0}
    assert after["lamina_layers"][1][""] == 3.0  # the container's init layer counts
    assert after["lamina_driver_hook_calls_total"][1]['{hook="lamina_apply_diff"}'] == 3.0  # and the init layer
    # the table and JSON show the operations beside the hooks
    table = lamina_cli("info", root=store).stdout.decode()
    assert "Operations:\n  container.create: 1 calls, 0 errors" in table
    timings = json.loads(lamina_cli("info", "--format", "json", root=store).stdout)["timings"]
    assert timings["image.tag"]["calls"] == 2 and timings["lamina_apply_diff"]["calls"] == 3
    proc = lamina_cli("--format", "prometheus", "images", root=store, check=False)
    assert proc.returncode == 2  # only info speaks it


def test_the_exposition_parser_is_strict() -> None:
    good = "# HELP a_total x\n# TYPE a_total counter\na_total{op=\"p\\\"q\"} 1.5e-05\n"
    assert parse_exposition(good) == {"a_total": ("counter", {'{op="p\\"q"}': 1.5e-05})}
    for bad in ("# TYPE a counter\na 1\n", good + "# HELP b x\n# TYPE b gauge\nb 1\na_total 2\n",
                good.replace("1.5e-05", "1,5"), good.replace('{op="p\\"q"}', "{op=p}"), good[:-1],
                good + "# TYPE a_total counter\n"):
        with pytest.raises(AssertionError):
            parse_exposition(bad)
