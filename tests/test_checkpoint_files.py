"""A checkpoint's manifest names only files of its own folder: anything else is refused before
a file is opened."""

from __future__ import annotations

import json

import pytest

from ppfast.checkpoint import files, read_manifest


@pytest.mark.parametrize(
    "name", ["../stage-0.pt", "/etc/passwd", "sub/stage-0.pt", "..", "", "a\\b.pt", "x\0.pt", 3]
)
@pytest.mark.parametrize("key", ["file", "extra_file"])
def test_a_manifest_naming_a_file_outside_its_folder_is_refused(tmp_path, key, name):
    rec = {"index": 0, "file": "stage-0.pt", "extra_file": None, key: name}
    manifest = {"format": files.FORMAT, "version": files.VERSION, "save_id": "x", "stages": [rec]}
    (tmp_path / files.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="not a plain file name"):
        read_manifest(tmp_path)


def test_plain_names_are_accepted(tmp_path):
    rec = {"index": 0, "file": "stage-0-of-2.pt", "extra_file": "stage-0-of-2.extra.pt"}
    manifest = {"format": files.FORMAT, "version": files.VERSION, "save_id": "x", "stages": [rec]}
    (tmp_path / files.MANIFEST).write_text(json.dumps(manifest))
    assert read_manifest(tmp_path)["stages"][0]["file"] == "stage-0-of-2.pt"
