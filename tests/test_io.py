"""attnrhythm.io: the one corrupt-line policy, NaN <-> null, atomic writes."""
import json
import math

import numpy as np
import pytest
import torch

from attnrhythm import io
from attnrhythm.errors import UserError


def test_a_cut_last_line_is_skipped_and_repaired(tmp_path):
    path = tmp_path / "m.jsonl"
    io.append_jsonl(path, [{"a": 1}, {"a": 2}])
    with path.open("a") as f:
        f.write('{"a": 3, "b"')  # killed in the middle of a write
    assert io.read_jsonl(path) == [{"a": 1}, {"a": 2}]
    assert io.read_jsonl(path, repair=True) == [{"a": 1}, {"a": 2}]
    io.append_jsonl(path, [{"a": 3}])  # appending continues on a whole line
    assert io.read_jsonl(path) == [{"a": 1}, {"a": 2}, {"a": 3}]


def test_a_bad_line_in_the_middle_is_refused(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"a": 1}\n{oops\n{"a": 2}\n')
    with pytest.raises(UserError, match=r"m.jsonl:2: not valid JSON.*damaged"):
        io.read_jsonl(path)


def test_a_user_file_is_refused_even_at_its_last_line(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text('{"a": 1}\n{oops\n')
    with pytest.raises(UserError, match=r"in.jsonl:2"):
        io.numbered_jsonl(path, interrupted_tail=False)
    assert io.read_jsonl(tmp_path / "missing.jsonl") == []


def test_nan_becomes_null_and_back():
    record = {"x": [1.0, math.nan, math.inf], "y": np.float32(0.5), "z": torch.tensor(2.0), "t": (1, 2)}
    assert json.loads(io.to_json(record)) == {"x": [1.0, None, None], "y": 0.5, "z": 2.0, "t": [1, 2]}
    assert io.float_list(torch.tensor([0.1, math.nan], dtype=torch.float64)) == [0.1, None]
    back = io.float_series([0.1, None])
    assert back[0].item() == 0.1 and math.isnan(back[1].item())


def test_atomic_writes_leave_no_temporary_files(tmp_path):
    io.write_json(tmp_path / "a" / "x.json", {"v": math.nan})
    io.write_yaml(tmp_path / "a" / "x.yaml", {"v": 1}, header="# h\n")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["x.json", "x.yaml"]
    assert json.loads((tmp_path / "a" / "x.json").read_text()) == {"v": None}
    assert (tmp_path / "a" / "x.yaml").read_text() == "# h\nv: 1\n"
