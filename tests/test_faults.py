"""kill -9 at random instants of lamina's commands, on vfs and overlay: a sample of bench/faults.py's long run,
and regression tests for the windows it found, each killed at its exact instant (tests/fault_harness.py).

``LAMINA_FAULT_SEED`` and ``LAMINA_FAULT_TRIALS`` (per command and driver) change the sample; a failure
names the seed, driver, command, trial and delay.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
from fault_harness import (
    DRIVERS,
    FaultStore,
    Inputs,
    build_inputs,
    kill_at,
    layer_tar,
    push_pulled_image,
    remove_scratch,
    run,
    scratch_dir,
    write_docker_archive,
)
from registry_fixtures import Registry
from store_invariants import check_store

from conftest import lamina_cli
from lamina.testing import require_root

SEED = int(os.environ.get("LAMINA_FAULT_SEED", "20240611"))
TRIALS = int(os.environ.get("LAMINA_FAULT_TRIALS", "3"))


@pytest.fixture(scope="session")
def fault_inputs(tmp_path_factory: pytest.TempPathFactory) -> Inputs:
    return build_inputs(tmp_path_factory.mktemp("fault-inputs"))


@pytest.fixture(scope="session")
def fault_registry(fault_inputs: Inputs, registry: Registry) -> str:
    """The registry's host, holding fault/pulled:1 (pushed by skopeo)."""
    push_pulled_image(fault_inputs, registry.host)
    return registry.host


@pytest.mark.parametrize("driver", DRIVERS)
def test_kill_at_random_instants_keeps_the_store_consistent(
    tmp_path: Path, driver: str, fault_inputs: Inputs, fault_registry: str
) -> None:
    if driver == "overlay":
        require_root()
    # `system check --quick` after each trial keeps the sample within its time: the harness reads every layer
    # and blob back itself, and bench/faults.py runs the full check
    store = FaultStore(scratch_dir(f"lamina-faults-{driver}-", tmp_path), driver, fault_inputs, fault_registry,
                       quick_check=True)
    try:
        store.prepare()
        outcomes = run(store, SEED, dict.fromkeys(store.ops(), TRIALS))
    finally:
        remove_scratch(store)
    bad = [o.describe(SEED) for o in outcomes if o.problems]
    assert bad == [], "\n".join(bad)
    trials = [o for o in outcomes if o.trial >= 0]
    assert len(trials) == TRIALS * len(store.ops())
    # the delays fall within the commands' durations: most trials are killed mid-way, not run to their end
    assert sum(o.killed for o in trials) >= len(trials) // 2, [(o.op, o.delay, o.seconds) for o in trials]


def test_kill_at_random_instants_keeps_a_store_with_an_image_store_consistent(
    tmp_path: Path, fault_inputs: Inputs, fault_registry: str
) -> None:
    """The same sample on overlay with the images kept apart (``--image-store``): one trial per command."""
    require_root()
    store = FaultStore(scratch_dir("lamina-faults-apart-", tmp_path), "overlay", fault_inputs, fault_registry,
                       quick_check=True, image_store=True)
    try:
        store.prepare()
        assert store.image_root is not None and (store.image_root / "overlay").is_dir()
        outcomes = run(store, SEED, dict.fromkeys(store.ops(), 1))
    finally:
        remove_scratch(store)
    bad = [o.describe(SEED) for o in outcomes if o.problems]
    assert bad == [], "\n".join(bad)
    assert len([o for o in outcomes if o.trial >= 0]) == len(store.ops())


# -- the windows the long run found, each killed at its exact instant ----------------------------------
def _one_image(tmp_path: Path, driver: str, layers: int = 1) -> str:
    """A store with fault/one:1 (``layers`` small layers), loaded from a docker-archive; returns its ID."""
    archive = tmp_path / "one"
    image_id = write_docker_archive(archive, "fault/one:1", [layer_tar(f"one{i}", 5, 1024) for i in range(layers)])
    lamina_cli("--driver", driver, "load", "-q", "-i", str(archive), root=tmp_path)
    return image_id


def _killed_at(tmp_path: Path, point: str, *args: str, when: str = "call") -> None:
    proc = kill_at(point, ["--root", str(tmp_path / "root"), "--runroot", str(tmp_path / "run"), *args], when=when)
    assert proc.returncode == -signal.SIGKILL, f"{point} was not reached: {proc.returncode} {proc.stderr}"
    lamina_cli("images", root=tmp_path)  # the next command: it recovers what the killed one left


def _images(tmp_path: Path) -> dict[str, list[str]]:
    return {i["Id"]: i["RepoTags"] for i in json.loads(lamina_cli("images", "--format", "json", root=tmp_path).stdout)}


@pytest.mark.parametrize("driver", DRIVERS)
def test_rmi_killed_before_collecting_its_blobs_leaves_none_behind(tmp_path: Path, driver: str) -> None:
    """The image's row went in one transaction and its blobs were to go after it: the blobs are held by a
    lease from that transaction on, which the next command ends and collects."""
    if driver == "overlay":
        require_root()
    _one_image(tmp_path, driver)
    _killed_at(tmp_path, "lamina.store.images:ImageStore.gc", "rmi", "fault/one:1")
    assert _images(tmp_path) == {}
    assert check_store(tmp_path / "root", tmp_path / "run", driver) == []
    assert list((tmp_path / "root" / "content" / "blobs" / "sha256").iterdir()) == []


@pytest.mark.parametrize("argv", [["rmi", "fault/one:1"], ["untag", "fault/one:1", "fault/one:1"]])
def test_removing_the_last_name_is_one_step_with_removing_the_image(tmp_path: Path, argv: list[str]) -> None:
    """The last name went in one transaction and the image in the next: a kill between them left a nameless
    image. Now both go in the transaction that deletes the image; a kill before it leaves the image named."""
    image_id = _one_image(tmp_path, "vfs")
    _killed_at(tmp_path, "lamina.store.images:ImageStore.delete", *argv)
    assert _images(tmp_path) == {image_id: ["fault/one:1"]}
    assert check_store(tmp_path / "root", tmp_path / "run", "vfs") == []
    lamina_cli(*argv, root=tmp_path)
    assert _images(tmp_path) == {}


def test_squash_killed_while_reading_the_image_leaves_no_mount(tmp_path: Path) -> None:
    """overlay mounted the image's top layer itself to read its whole tree, and a kill left that mount
    uncounted. lamina now holds a mount reference on both sides of any diff the driver does not take
    natively, so what is mounted for it is counted and the next command unmounts it."""
    require_root()
    _one_image(tmp_path, "overlay", layers=2)
    _killed_at(tmp_path, "lamina.drivers.overlay:diff_tar", "squash", "fault/one:1")
    assert check_store(tmp_path / "root", tmp_path / "run", "overlay") == []


@pytest.mark.parametrize("argv", [["mount", "c"], ["commit", "c", "fault/two:1"]])
def test_killed_as_the_driver_mounts_leaves_no_mount(tmp_path: Path, argv: list[str]) -> None:
    """The mount reference was recorded only after the driver had mounted: a kill in between left a mount
    nothing counted. Now it is recorded first, as the process's own, and made lasting after the mount."""
    require_root()
    _one_image(tmp_path, "overlay")
    lamina_cli("create", "--name", "c", "fault/one:1", root=tmp_path)
    _killed_at(tmp_path, "lamina.plugins.active:ActiveDriver.mount", *argv, when="return")
    assert check_store(tmp_path / "root", tmp_path / "run", "overlay") == []
    lamina_cli("mount", "c", root=tmp_path)  # and mounting works as before
    lamina_cli("umount", "c", root=tmp_path)
    assert check_store(tmp_path / "root", tmp_path / "run", "overlay") == []


@pytest.mark.parametrize("argv", [["umount", "c"], ["commit", "c", "fault/two:1"]])
def test_killed_as_the_driver_unmounts_leaves_no_mount(tmp_path: Path, argv: list[str]) -> None:
    """The last mount reference was dropped before the driver unmounted: a kill in between left a mount
    nothing counted. Now the process holds a reference of its own until the driver has unmounted."""
    require_root()
    _one_image(tmp_path, "overlay")
    lamina_cli("create", "--name", "c", "fault/one:1", root=tmp_path)
    if argv[0] == "umount":
        lamina_cli("mount", "c", root=tmp_path)
    _killed_at(tmp_path, "lamina.plugins.active:ActiveDriver.unmount", *argv)
    assert check_store(tmp_path / "root", tmp_path / "run", "overlay") == []

