"""`benchmarks.records`: a script's --json is refused before the work if it exists, and
written whole after it."""
import argparse
import json

import pytest

from benchmarks import records


def test_existing_output_refused_before_the_work(tmp_path, capsys):
  out = tmp_path / "r.json"
  out.write_text("earlier results\n")
  with pytest.raises(SystemExit):
    records.check_json_out(argparse.ArgumentParser(prog="bench"), str(out))
  assert "--json" in capsys.readouterr().err
  assert out.read_text() == "earlier results\n"
  records.check_json_out(argparse.ArgumentParser(), str(tmp_path / "new.json"))
  records.check_json_out(argparse.ArgumentParser(), None)


def test_record_printed_and_written(tmp_path, capsys):
  out = tmp_path / "r.json"
  records.emit({"value": 1.5, "unit": "s"}, str(out))
  assert json.loads(capsys.readouterr().out) == {"value": 1.5, "unit": "s"}
  assert json.loads(out.read_text()) == {"value": 1.5, "unit": "s"}
  assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temporary left
