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


def test_flops_option_chooses_how_run_counts(tmp_path):
    import json

    methods = {}
    for mode in ("all", "sample", "off"):
        out = tmp_path / mode
        assert main(["run", "--quiet", "--strategy", "naive", "--scenario", "synthetic-2", "--epochs", "3",
                     "--flops", mode, "--output-dir", str(out)]) == 0
        result = json.loads(next(out.rglob("*.json")).read_text())
        methods[mode] = [r["flops_method"] for r in result["edge"]["per_experience"]]
        if mode != "off":
            methods[mode + " total"] = result["edge"]["totals"]["train_flops_total"]
    assert set(methods["all"]) == {"exact"} and set(methods["sample"]) == {"sampled"} and set(methods["off"]) == {"off"}
    assert methods["all total"] == methods["sample total"]
