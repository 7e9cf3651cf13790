"""Result sets: one run's files appear together or not at all, and a run says when it
replaces another's."""
import json
import os

import pytest
from plato_jax import report


def publish(out, run_id, payload, name="scaling"):
  result = report.ResultSet(str(out), name, run_id, {"run": run_id})
  result.write_json(f"{name}.json", payload)
  result.write_csv(f"{name}.csv", [{"a": payload["a"]}])
  result.write_json(f"{name}.extra.json", {"a": payload["a"]})
  return result, result.publish()


def shown(out, name="scaling"):
  """(run id, payload) that out/name shows, after checking the set is whole."""
  manifest = report.read_set(os.path.join(out, name))
  payload = json.loads((out / name / f"{name}.json").read_text())
  csv_value = (out / name / f"{name}.csv").read_text().splitlines()[1]
  assert str(payload["a"]) == csv_value  # the csv is the same run's
  return manifest["run_id"], payload


def test_sets_switch_as_one_and_earlier_ones_stay(tmp_path):
  first, before = publish(tmp_path, "r1", {"a": 1})
  assert before is None and shown(tmp_path, ) == ("r1", {"a": 1})
  second, before = publish(tmp_path, "r2", {"a": 2})
  assert before["run_id"] == "r1" and before["folder"] == os.path.realpath(first.folder)
  assert shown(tmp_path) == ("r2", {"a": 2})
  assert report.read_set(first.folder)["run_id"] == "r1"  # kept
  assert os.readlink(tmp_path / "scaling").startswith(report.SETS + "/")  # relative: movable


@pytest.mark.parametrize("step", range(12))
def test_a_run_dying_at_any_step_leaves_the_previous_set_or_its_own(tmp_path, monkeypatch, step):
  """Every file operation of a run, in turn, is where it dies (nothing after it happens):
  out/scaling shows the whole old set, or the whole new one."""
  publish(tmp_path, "old", {"a": 1})
  calls = []

  def dies_at(fn):
    def wrapped(*args, **kwargs):
      calls.append(fn.__name__)
      if len(calls) > step:
        raise KeyboardInterrupt("killed")
      return fn(*args, **kwargs)
    return wrapped

  for name in ("replace", "rename", "symlink", "fsync"):
    monkeypatch.setattr(report.os, name, dies_at(getattr(os, name)))
  try:
    publish(tmp_path, "new", {"a": 2})
    died = False
  except KeyboardInterrupt:
    died = True
  monkeypatch.undo()
  assert shown(tmp_path) in (("old", {"a": 1}), ("new", {"a": 2}))
  if not died:  # 4 files, each written then renamed; the set renamed, linked, switched
    assert step == 11 and len(calls) == 11 and shown(tmp_path)[0] == "new"
  else:
    publish(tmp_path, "next", {"a": 3})  # what a killed run left does not stop the next
    assert shown(tmp_path) == ("next", {"a": 3})


def test_damage_and_strangers_are_named(tmp_path):
  publish(tmp_path, "r1", {"a": 1})
  (tmp_path / "scaling" / "scaling.csv").write_text("a\n7\n")
  with pytest.raises(ValueError, match=r"scaling\.csv does not match its manifest"):
    report.read_set(str(tmp_path / "scaling"))
  publish(tmp_path, "r2", {"a": 2})
  os.unlink(tmp_path / "scaling" / "scaling.extra.json")
  with pytest.raises(ValueError, match=r"scaling\.extra\.json is missing"):
    report.read_set(str(tmp_path / "scaling"))
  (tmp_path / "k_sweep").mkdir()  # a folder the user made: never replaced
  with pytest.raises(ValueError, match=r"k_sweep exists and is not a result set"):
    report.ResultSet(str(tmp_path), "k_sweep", "r", {})
  with pytest.raises(ValueError, match="a plain name"):
    report.ResultSet(str(tmp_path), "x", "r", {}).write_json("../x.json", {})


def test_only_the_newest_sets_are_kept(tmp_path):
  for i in range(report.KEEP + 3):
    publish(tmp_path, f"r{i}", {"a": i})
  kept = sorted(os.listdir(tmp_path / report.SETS))
  assert len(kept) == report.KEEP and shown(tmp_path)[0] == f"r{report.KEEP + 2}"
  assert {report.read_set(str(tmp_path / report.SETS / f))["run_id"] for f in kept} == \
      {f"r{i}" for i in range(3, report.KEEP + 3)}


def test_a_run_says_when_out_shows_another_runs_results(tmp_path):
  def notice():
    previous = report.current_set(str(tmp_path), "scaling")
    return previous and report.notice_of_earlier_run(str(tmp_path), "scaling", previous)

  assert notice() is None
  publish(tmp_path, "r1", {"a": 1})
  said = notice()
  assert "shows the results of an earlier run (run r1" in said and report.SETS in said
  (tmp_path / "scaling" / report.MANIFEST).write_text("{")
  assert "manifest is unreadable" in notice()


def test_csv_holds_every_rows_columns(tmp_path):
  """Rows may carry extra columns (an interval only some metrics have): the header is every
  column, in order of first appearance, and a row without one leaves it empty."""
  result = report.ResultSet(str(tmp_path), "grid", "r1", {})
  result.write_csv("grid.csv", [{"metric": "cka", "score": 0.5},
                                {"metric": "mutual_knn", "score": 0.25, "score_low": 0.2}])
  result.publish()
  lines = (tmp_path / "grid" / "grid.csv").read_text().splitlines()
  assert lines == ["metric,score,score_low", "cka,0.5,", "mutual_knn,0.25,0.2"]


def test_format_table_of_no_rows_is_its_header():
  assert report.format_table([], ["size", "lift_area"]) == "size  lift_area"
  assert report.format_table([dict(size=10, lift_area=1.23456)], ["size", "lift_area"]).splitlines() == [
      "size  lift_area", "  10      1.235"]
