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
