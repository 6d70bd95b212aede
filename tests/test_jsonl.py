"""radfm_jax.data.jsonl: the one JSONL reader: per-line objects or errors, 1-based lines, blank lines skipped."""
from radfm_jax.data import jsonl


def test_objects_and_errors_per_line(tmp_path):
  path = tmp_path / "x.jsonl"
  path.write_bytes(b'{"a": 1}\n\n[1, 2]\n{"b": \n{"c": "caf\xe9"}\n' + b"[" * 100_000 + b"\n"
                   + b'{"n": ' + b"9" * 5000 + b"}\n" + '{"d": "\u2603"}\n'.encode())
  got = list(jsonl.read_objects(str(path)))
  assert [n for n, _ in got] == [1, 3, 4, 5, 6, 7, 8]
  assert got[0][1] == {"a": 1} and got[-1][1] == {"d": "\u2603"}
  reasons = [str(o) for _, o in got[1:-1]]
  assert all(isinstance(o, ValueError) for _, o in got[1:-1])
  assert "expected a JSON object, got list" in reasons[0]
  assert "not valid JSON" in reasons[1]
  assert "invalid UTF-8 at byte 10" in reasons[2]
  assert "nested too deeply" in reasons[3]
  assert "not valid JSON" in reasons[4] and "limit" in reasons[4]


def test_objects_of_text_lines():
  assert list(jsonl.objects(['{"x": 1}', "  ", '"s"'])) [0] == (1, {"x": 1})
  (n, err), = [r for r in jsonl.objects(['{"x": 1}', "  ", '"s"']) if isinstance(r[1], ValueError)]
  assert n == 3 and "got str" in str(err)
