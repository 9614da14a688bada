"""`clbench profile`: table per experience, totals, extrapolation, user errors."""

from clbench.cli import main


def test_profile_prints_a_row_per_experience_and_the_totals(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["profile", "--strategy", "naive", "--scenario", "synthetic-2", "--steps", "2", "--epochs", "3"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert [r[0] for r in rows] == ["1", "2"] and all(r[1] == "2" for r in rows)  # 2 steps per experience
    assert "planned full run: train FLOPs" in out
    assert "estimated ± " in out and "estimated:jetson-orin-nx-16gb:MAXN:" in out
    assert not (tmp_path / "results").exists()  # a truncated profile is never stored as a result


def test_profile_rejects_unknown_device_and_bad_steps(capsys):
    assert main(["profile", "--strategy", "naive", "--scenario", "synthetic-2", "--device", "jetson-tx9"]) == 2
    assert "unknown device 'jetson-tx9'" in capsys.readouterr().err
    assert main(["profile", "--strategy", "naive", "--scenario", "synthetic-2", "--steps", "0"]) == 2
    assert "--steps 0" in capsys.readouterr().err
