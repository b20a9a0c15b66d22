import pytest

from netemu import cli


def test_not_root_is_refused(monkeypatch, capsys):
    monkeypatch.setattr(cli.clusters.os, "geteuid", lambda: 1000)
    assert cli.main(["get", "pods"]) == 1
    err = capsys.readouterr().err
    assert "must run as root" in err and len(err.strip().splitlines()) == 1


def test_bad_usage_exits_2(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["get"])
    assert e.value.code == 2


def test_unknown_verb_exits_2():
    with pytest.raises(SystemExit) as e:
        cli.main(["frobnicate"])
    assert e.value.code == 2


@pytest.mark.parametrize("word,message", [
    ("ep", 'Error from server (NotFound): endpoints "nosuch" not found'),        # was: endpointss
    ("jobs", 'Error from server (NotFound): jobs.batch "nosuch" not found'),
    ("po", 'Error from server (NotFound): pods "nosuch" not found'),
])
def test_get_missing_object_words_it_as_kubectl(tmp_path, monkeypatch, capsys, word, message):
    from netemu.store.sqlite import SqliteStore

    store = SqliteStore(str(tmp_path / "state.db"), create=True)
    monkeypatch.setattr(cli.clusters, "require_root", lambda: None)
    monkeypatch.setattr(cli, "_store", lambda args: ("c", store))
    assert cli.main(["get", word, "nosuch"]) == 1
    assert capsys.readouterr().err.strip() == message
    assert cli.main(["describe", word, "nosuch"]) == 1
    assert capsys.readouterr().err.strip() == message
