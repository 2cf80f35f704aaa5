"""The shared-folder lock: a second holder waits for the first, and says so once."""
from __future__ import annotations

import threading

from common import files


def test_a_second_holder_waits_until_the_first_releases(tmp_path):
    lock_path = tmp_path / "folder" / "work.lock"  # the folder is created
    waiting, entered, order = threading.Event(), threading.Event(), []

    def second():
        with files.exclusive_lock(lock_path, on_wait=waiting.set) as locked:
            order.append(("second", locked))
            entered.set()

    with files.exclusive_lock(lock_path) as locked:
        assert locked is True
        thread = threading.Thread(target=second)
        thread.start()
        assert waiting.wait(timeout=30), "the second holder never found the lock taken"
        assert not entered.is_set()  # it waits while the first holds the lock
        order.append(("first", locked))
    assert entered.wait(timeout=30)
    thread.join(timeout=30)
    assert order == [("first", True), ("second", True)]


def test_a_free_lock_is_taken_without_waiting(tmp_path):
    calls = []
    with files.exclusive_lock(tmp_path / "work.lock", on_wait=lambda: calls.append("waited")) as locked:
        assert locked is True
    with files.exclusive_lock(tmp_path / "work.lock", on_wait=lambda: calls.append("waited")) as locked:
        assert locked is True  # released by the first block
    assert calls == []


def test_a_folder_that_cannot_be_written_locks_nothing(tmp_path):
    blocker = tmp_path / "a file"
    blocker.write_text("not a folder")
    with files.exclusive_lock(blocker / "work.lock") as locked:  # its folder cannot be created
        assert locked is False
