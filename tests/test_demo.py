"""The demo runs end to end (one short epoch per set-up), prints its tables and writes a plot."""

from __future__ import annotations

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("tqdm")
pytest.importorskip("matplotlib")

from jdoptim import demo  # noqa: E402


def test_demo_runs_and_reports(tmp_path, capsys) -> None:
    out = tmp_path / "curves.png"
    assert demo.main(["--epochs", "1", "--quiet", "--plot", str(out)]) == 0
    text = capsys.readouterr().out
    assert "multi-task" in text and "per-sample" in text
    assert "UPGrad" in text and "plain" in text
    assert out.stat().st_size > 10_000


def test_demo_jd_never_conflicts_plain_iwrm_does() -> None:
    data = demo.load_data(0)
    kwargs = dict(epochs=1, batch_size=32, lr=0.1, seed=0, compile_step=False, quiet=True)
    plain = demo.train("iwrm", "plain", data, **kwargs)
    jd = demo.train("iwrm", "UPGrad", data, **kwargs)
    assert jd.conflict_rate == 0.0
    assert plain.conflict_rate > 0.5
    assert jd.metrics["accuracy"] > 0.8


def test_unknown_weighting_is_rejected() -> None:
    with pytest.raises(SystemExit):
        demo.main(["--weighting", "NoSuchMethod"])
