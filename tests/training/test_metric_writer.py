"""metrics.jsonl and TensorBoard events from MetricWriter, and a start-up that does not load torch."""
import struct
import subprocess
import sys
from pathlib import Path

from helpers.repo import REPO
from mefem_jax.training.metric_writer import read_metrics

ROOT = REPO


def _event_scalars(tb_dir: Path) -> list[tuple[int, str, float]]:
    """(step, tag, value) of every scalar in the event files, read back with tensorboardX's protos."""
    from tensorboardX.proto import event_pb2

    out = []
    for path in sorted(tb_dir.glob("events.out.tfevents*")):
        data, i = path.read_bytes(), 0
        while i < len(data):  # TFRecord framing: length, crc(length), payload, crc(payload)
            (n,) = struct.unpack("<Q", data[i:i + 8])
            event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
            out += [(event.step, v.tag, v.simple_value) for v in event.summary.value]
            i += 12 + n + 4
    return out


def test_writes_jsonl_and_tensorboard_without_importing_torch(tmp_path):
    # A fresh interpreter: in this one other tests may have imported torch already.
    code = (
        "import sys\n"
        "from mefem_jax.training.metric_writer import MetricWriter\n"
        f"w = MetricWriter({str(tmp_path)!r})\n"
        "w.write(1, {'loss': 0.5, 'lr': 1e-3, 'note': float('nan')})\n"
        "w.write(2, {'loss': 0.25})\n"
        "w.close()\n"
        "print('torch loaded:', 'torch' in sys.modules)\n"
        "import torch\n"  # hidden only during tensorboardX's import: importable afterwards (test extra)
        "print('torch imported:', torch.__version__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "torch loaded: False" in out.stdout and "torch imported:" in out.stdout
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert rows == [{"step": 1, "loss": 0.5, "lr": 1e-3, "note": "nan"}, {"step": 2, "loss": 0.25}]
    scalars = _event_scalars(tmp_path / "tb")
    assert (1, "loss", 0.5) in scalars and (2, "loss", 0.25) in scalars
    assert not any(tag == "note" for _, tag, _ in scalars)  # non-finite values stay out of TensorBoard
