"""make_fixtures.py: a missing or wrong release folder is a user's mistake, reported in one line."""

import importlib.util

import pytest

from conftest import FIXTURES


def _make_fixtures():
    spec = importlib.util.spec_from_file_location("make_fixtures", FIXTURES / "make_fixtures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("exists", [False, True])
def test_bad_release_folder_names_it(tmp_path, capsys, exists):
    release = tmp_path / "py-meanflow"
    if exists:
        release.mkdir()  # a folder, but not the release
    with pytest.raises(SystemExit) as err:
        _make_fixtures().main([str(release), "--out", str(tmp_path / "out")])
    assert err.value.code != 0
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert "error: " in message and str(release) in message and "github.com/Gsunshine/py-meanflow" in message
    assert not (tmp_path / "out").exists()
