"""core/atomic.py: the one way files and folders are written (temp sibling, fsync, rename, fsync the folder)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch

from fedrag_app.core import atomic
from fedrag_app.core.atomic import atomic_dir, atomic_path, swap_in, write_bytes, write_json, write_text


@pytest.fixture
def synced(monkeypatch) -> list[Path]:
    """Every path os.fsync is called on, in order."""
    calls: list[Path] = []
    real = os.fsync

    def spy(fd: int) -> None:
        calls.append(Path(os.readlink(f"/proc/self/fd/{fd}")))
        real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    return calls


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_file_writes_are_fsynced_renamed_and_leave_no_temp(tmp_path, synced):
    write_text(tmp_path / "a.txt", "é\n")
    write_json(tmp_path / "b.json", {"z": 1, "a": [1]})
    write_bytes(tmp_path / "key", b"secret", private=True)
    assert (tmp_path / "a.txt").read_text(encoding="utf-8") == "é\n"
    assert (tmp_path / "b.json").read_text() == '{\n  "a": [\n    1\n  ],\n  "z": 1\n}\n'
    assert stat.S_IMODE((tmp_path / "key").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o644
    assert _leftovers(tmp_path) == []
    assert tmp_path in synced  # the rename itself is made durable
    assert sum(p.parent == tmp_path and p.name.startswith(".a.txt.") for p in synced) == 1  # data before rename


def test_failed_write_keeps_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "plot.png"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        assert tmp.name.endswith(".png")  # savefig picks the format from the suffix
        tmp.write_bytes(b"half")
        raise RuntimeError("writer crashed")
    assert target.read_bytes() == b"old"
    assert _leftovers(tmp_path) == []


def test_atomic_dir_fsyncs_every_file_and_replaces_whole(tmp_path, synced):
    target = tmp_path / "round-1"
    (target / "stale").mkdir(parents=True)
    with atomic_dir(target) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "weights.bin").write_bytes(b"w")
    assert sorted(p.name for p in target.rglob("*")) == ["sub", "weights.bin"]
    assert any(p.name == "weights.bin" for p in synced)  # the old atomic_dir never fsynced: a crash lost a round
    assert _leftovers(tmp_path) == []
    with pytest.raises(ValueError), atomic_dir(target) as tmp:
        (tmp / "partial").write_bytes(b"x")
        raise ValueError
    assert (target / "sub" / "weights.bin").exists() and not (target / "partial").exists()
    assert _leftovers(tmp_path) == []


def test_swap_in_keep_and_error_never_touch_an_existing_folder(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "config.json").write_text("theirs")
    ours = atomic.staging_dir(target)
    (ours / "config.json").write_text("ours")
    assert swap_in(ours, target, exists="keep") is False
    with pytest.raises(FileExistsError):
        swap_in(ours, target, exists="error")
    assert (target / "config.json").read_text() == "theirs"
    assert swap_in(ours, target, exists="replace") is True
    assert (target / "config.json").read_text() == "ours" and _leftovers(tmp_path) == []


def test_personal_adapter_is_fsynced(tmp_path, synced):
    """federation/personal.py used to rename without fsync: a power cut could leave an empty adapter."""
    from fedrag_app.federation.personal import RoundOf, _saved, save_personal

    save_personal(tmp_path, {"w": torch.ones(2)}, RoundOf(run_id=1, server_round=3))
    assert list(_saved(tmp_path)) == [3] and _leftovers(tmp_path) == []
    assert any(".personal-adapter-round-3" in p.name for p in synced)


def _build_once(target: str, log: str) -> None:
    """What a loader does on first use: under the build lock, build only if nobody has yet (slowly, to overlap)."""
    import time

    from fedrag_app.core.atomic import build_lock

    with build_lock(target):
        if Path(target).exists():
            return
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(0.3)
        with atomic_dir(target) as tmp:
            (tmp / "config.json").write_text("{}")


def test_processes_starting_at_once_build_once_under_the_build_lock(tmp_path):
    import multiprocessing

    target, log = tmp_path / "models" / "m-fp32", tmp_path / "builds.log"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_build_once, args=(str(target), str(log))) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert len(log.read_text().splitlines()) == 1, "every process built it: the lock did not serialise them"
    assert (target / "config.json").exists() and _leftovers(target.parent) == [".m-fp32.lock"]  # no temp folder
