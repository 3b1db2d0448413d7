"""`amortized demo` (what `make demo` runs) finishes with every checked row passing."""

import json

from typer.testing import CliRunner

from amortized.cli import app


def test_demo_runs_end_to_end(tmp_path):
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    results = json.loads((tmp_path / "results.json").read_text())
    rows = [row for step in results.values() for row in step["rows"]]
    assert len(results) >= 4 and rows
    assert not [row for row in rows if row.get("ok") is False]
