"""The `lyra-pl` entry point: its version, and a one-line error for an unknown command."""
from lyra_pl import __version__, cli


def test_version(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"lyra-pl {__version__}"


def test_unknown_command_says_so(capsys):
    assert cli.main(["fitt", "--config", "x.yaml"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown command 'fitt'" in err[0] and "fit" in err[0]
    assert cli.main(["data", "conv"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'data conv'" in err and "data convert" in err
    assert cli.main(["--help"]) == 0 and "usage: lyra-pl" in capsys.readouterr().out
