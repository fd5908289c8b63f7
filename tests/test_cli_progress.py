"""The progress line: done/total, rate and a sane ETA, within 80 columns, only on a terminal."""
import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest
import torch

import trainers
from conftest import FIXTURES, save_checkpoint
from sfckpt.progress import Progress, render

SFCKPT = str(Path(sys.executable).parent / "sfckpt")


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_eta_is_what_is_left_over_the_rate():
    total = 1.07e9
    assert "ETA --:--" in render("writing x", 0, total, 0.0, 80)  # no rate yet: no made-up ETA
    line = render("writing x", 0.5 * total, total, 2.0, 80, per_second=268e6)
    assert "0.54/1.07 GB" in line and "268 MB/s" in line and "ETA 0:02" in line
    line = render("writing x", 0.95 * total, total, 4.0, 80, per_second=250e6)
    assert "95%" in line and "ETA 0:00" in line
    done = render("writing x", total, total, 4.2, 80)
    assert "100%" in done and "in 0:04" in done


def test_start_up_time_does_not_make_the_eta_absurd():
    """The 1 GB case of issue #12: seconds pass (imports, opening files) before the first bytes move."""
    clock = Clock()
    bar = Progress("writing x", 1.07e9, stream=open(os.devnull, "w"), clock=clock)
    clock.now += 4.0  # start-up
    bar.update(4096)  # a first small tensor
    for _ in range(10):
        clock.now += 0.1
        bar.update(25e6)  # then 250 MB/s
    rate = bar.rate(clock.now)
    assert 200e6 < rate < 300e6
    line = render("writing x", bar.done, bar.total, clock.now - bar.start, 80, per_second=rate)
    assert re.search(r"ETA 0:0[2-4]$", line.strip()), line


@pytest.mark.parametrize("width", [80, 60, 40])
@pytest.mark.parametrize("label,unit,total", [("writing x", "bytes", 3.2e9), ("comparing", "bytes", 12.7e9),
                                              ("BatchNorm statistics", "batches", 500)])
def test_every_line_fits(width, label, unit, total):
    for fraction in (0, 0.001, 0.37, 0.999, 1):
        for elapsed, rate in ((0, None), (0.7, 1e3), (95.0, 1e6), (4000.0, 3e9)):
            assert len(render(label, fraction * total, total, elapsed, width, unit, rate)) <= width - 1


def test_redraws_are_throttled_and_end_with_a_newline():
    class Sink:
        text = ""

        def write(self, s):
            self.text += s

        def flush(self):
            pass

    clock, sink = Clock(), Sink()
    bar = Progress("writing x", 1000, stream=sink, clock=clock)
    for _ in range(100):  # a burst of small tensors within one refresh interval
        bar.update(1)
    assert sink.text.count("\r") == 1
    clock.now += 1.0
    bar.update(900)
    bar.close()
    assert sink.text.count("\r") == 3 and sink.text.endswith("\n")
    assert "1.00/1.00 kB" in sink.text


def run_on_terminal(args, columns=80):
    """Run sfckpt with stderr on a pseudo-terminal of `columns` columns; what the terminal received."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    proc = subprocess.Popen([SFCKPT, *map(str, args)], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave)
    os.close(slave)
    received = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        received += chunk
    proc.wait()
    os.close(master)
    return proc.returncode, proc.stdout.read().decode(), received.decode()


@pytest.fixture(scope="module")
def big_checkpoint(tmp_path_factory):
    """A checkpoint of ~50 MB of weights, so that the line is drawn more than once."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 1024), *[torch.nn.Linear(1024, 1024) for _ in range(12)])
    opt = trainers.train(model, "sgd", steps=1)
    return save_checkpoint(tmp_path_factory.mktemp("big") / "big.pt", model, opt)


@pytest.mark.slow
@pytest.mark.parametrize("command", ["convert", "diff", "check"])
def test_progress_on_an_80_column_terminal(command, big_checkpoint, tmp_path):
    out = tmp_path / "x.safetensors"
    if command == "check":
        assert subprocess.run([SFCKPT, "convert", str(big_checkpoint), str(out)], capture_output=True).returncode == 0
    args = {"convert": ["convert", big_checkpoint, out], "diff": ["diff", big_checkpoint],
            "check": ["check", out, "--ckpt", big_checkpoint]}[command]
    code, stdout, terminal = run_on_terminal(args)
    assert code == 0, terminal
    bars = [s for s in re.split(r"[\r\n]", terminal) if "%" in s]
    assert all(len(s) <= 79 for s in bars), max(bars, key=len)
    assert bars and "100%" in bars[-1] and " MB" in bars[-1]
    assert not any(re.search(r"\d+d \d|ETA \d+:\d\d:\d\d", s) for s in bars)  # no day-long ETA for a job of seconds
    assert "%" not in stdout  # progress never on stdout


@pytest.mark.slow
def test_no_progress_when_stderr_is_not_a_terminal(tmp_path):
    proc = subprocess.run([SFCKPT, "convert", str(FIXTURES / "adamw_mlp.pt"), str(tmp_path / "x.safetensors")],
                          capture_output=True, text=True)
    assert proc.returncode == 0 and "%" not in proc.stderr and "\r" not in proc.stderr


@pytest.mark.slow
def test_quiet_and_json_draw_nothing_on_a_terminal(tmp_path):
    for extra in (["-q"], ["--json"]):
        code, _, terminal = run_on_terminal(["convert", FIXTURES / "adamw_mlp.pt", tmp_path / "x.safetensors", "--force", *extra])
        assert code == 0 and "%" not in terminal and "wrote" not in terminal
