"""scripts/carve_val.py: the validation split the learning curves choose their knobs on."""
import csv
import subprocess
import sys
from collections import Counter
from helpers.repo import REPO



def run(*args):
    return subprocess.run([sys.executable, str(REPO / "scripts" / "carve_val.py"), *args],
                          capture_output=True, text=True, timeout=60)


def test_carve_is_deterministic_and_touches_only_train_rows(utkface_dir, tmp_path):
    outs = []
    for name in ("a.csv", "b.csv"):
        proc = run(f"--labels={utkface_dir / 'labels.csv'}", f"--out={tmp_path / name}", "--percent=10")
        assert proc.returncode == 0, proc.stderr
        with open(tmp_path / name, newline="") as f:
            outs.append(list(csv.DictReader(f)))
    assert outs[0] == outs[1]  # the same faces in val on every run
    with open(utkface_dir / "labels.csv", newline="") as f:
        source = list(csv.DictReader(f))
    before, after = Counter(r["split"] for r in source), Counter(r["split"] for r in outs[0])
    assert after["test"] == before["test"]  # test rows never move
    assert after["train"] + after["val"] == before["train"]
    assert 0.08 < after["val"] / before["train"] < 0.12
    changed = [(a, b) for a, b in zip(source, outs[0]) if a != b]
    assert all(a["split"] == "train" and b["split"] == "val" and {**a, "split": "val"} == b for a, b in changed)


def test_bad_input_is_one_line(tmp_path):
    proc = run(f"--labels={tmp_path / 'missing.csv'}", f"--out={tmp_path / 'x.csv'}")
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "no labels CSV" in proc.stderr
    (tmp_path / "nosplit.csv").write_text("file,age\na.jpg,3\n")
    proc = run(f"--labels={tmp_path / 'nosplit.csv'}", f"--out={tmp_path / 'x.csv'}")
    assert proc.returncode == 2 and "no column(s) ['split']" in proc.stderr


def test_a_different_file_at_out_is_not_replaced(utkface_dir, tmp_path):
    out = tmp_path / "labels.csv"
    out.write_text("the user's own notes\n")
    proc = run(f"--labels={utkface_dir / 'labels.csv'}", f"--out={out}")
    assert proc.returncode == 2 and "--overwrite" in proc.stderr
    assert out.read_text() == "the user's own notes\n" and list(tmp_path.iterdir()) == [out]
    assert run(f"--labels={utkface_dir / 'labels.csv'}", f"--out={out}", "--overwrite").returncode == 0
    assert run(f"--labels={utkface_dir / 'labels.csv'}", f"--out={out}").returncode == 0  # same bytes: fine
