"""fsio.write_atomic: a reader sees the old file or the whole new one, and a failed write leaves
no temporary file behind."""

from __future__ import annotations

import json

import pytest

from kforcing_dist.fsio import write_atomic, write_json_atomic


def test_a_failed_write_keeps_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "summary.json"
    write_json_atomic(target, {"step": 1})

    def half_then_fail(tmp):
        tmp.write_text('{"st')
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        write_atomic(target, half_then_fail)
    assert json.loads(target.read_text()) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_write_json_atomic_replaces_the_whole_file(tmp_path):
    target = tmp_path / "state.json"
    write_json_atomic(target, {"b": 1, "a": [1, 2]})
    write_json_atomic(target, {"step": 2})
    assert json.loads(target.read_text()) == {"step": 2} and target.read_text().endswith("\n")
