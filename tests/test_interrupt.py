"""Interrupting a real `llmq quantize` run (a subprocess) leaves nothing behind and exits cleanly.

The run writes into a hidden `.OUT.llmq-tmp-PID` folder that becomes OUT only at the very end
(llmq/save.py). The signal is sent at a point the log proves was reached, never after a sleep:
- during calibration (SIGINT -> exit 130, SIGTERM -> 143): after the "calibrating ..." log line, with
  thousands of windows still to go and the temporary folder already made;
- after the checkpoint is written (SIGTERM): after the "checkpoint written to ..." line of `--eval`, when the
  temporary folder holds the safetensors weights and only the evaluation and the rename are left.
Not covered: a signal inside `save_pretrained` itself. It lasts milliseconds for a tiny model, and hitting it
reliably would need a test hook in the product; the atomic folder is the same either way.
"""

from __future__ import annotations

import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import tiny_llama, tiny_text, tiny_tokenizer
from test_cli_errors import REPO, TMP_MARK, cli_env, leftovers

MESSAGES = {signal.SIGINT: (130, "llmq: interrupted; no partial output was left"),
            signal.SIGTERM: (143, "llmq: terminated; no partial output was left")}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("interrupt")
    tiny_llama().save_pretrained(root / "tiny")
    tiny_tokenizer().save_pretrained(root / "tiny")
    (root / "long.txt").write_text(tiny_text(330_000), encoding="utf-8")  # 20,000 windows of 16 tokens
    return {"tiny": str(root / "tiny"), "text": str(root / "long.txt"), "root": str(root)}


class Llmq:
    """A running `llmq` whose stderr lines arrive in a queue as they are written."""

    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "llmq.cli", *argv], cwd=REPO, env=cli_env(),
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        self.lines: list[str] = []
        self.out = ""
        self._q: queue.Queue[str | None] = queue.Queue()
        self._threads = [threading.Thread(target=self._read_err, daemon=True),
                         threading.Thread(target=self._read_out, daemon=True)]
        for t in self._threads:
            t.start()

    def _read_err(self) -> None:
        for line in self.proc.stderr:
            self._q.put(line.rstrip("\n"))
        self._q.put(None)

    def _read_out(self) -> None:
        self.out = self.proc.stdout.read()

    def wait_for(self, fragment: str, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while True:
            line = self._q.get(timeout=max(0.0, deadline - time.monotonic()))
            if line is None:
                pytest.fail(f"llmq ended before logging {fragment!r}:\n" + "\n".join(self.lines))
            self.lines.append(line)
            if fragment in line:
                return

    def finish(self, timeout: float = 120) -> int:
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()  # then say what it had logged: did it take the signal (and hang after) or not at all?
            code = None
        for t in self._threads:
            t.join(timeout=10)
        while (line := self._q.get_nowait() if not self._q.empty() else None) is not None:
            self.lines.append(line)
        if code is None:
            pytest.fail(f"llmq had not exited {timeout:g} s after the signal; its stderr:\n" + "\n".join(self.lines))
        return code


def _interrupt(argv: list[str], out: Path, sig: signal.Signals, when: str, must_hold: str | None) -> None:
    run = Llmq(argv)
    try:
        run.wait_for(when)
        tmp = [out.parent / n for n in leftovers(out)]
        assert len(tmp) == 1, f"no temporary folder at {when!r}: {sorted(p.name for p in out.parent.iterdir())}"
        if must_hold:
            assert (tmp[0] / must_hold).is_file()
        seen = len(run.lines)
        run.proc.send_signal(sig)
        code = run.finish()
    finally:
        if run.proc.poll() is None:
            run.proc.kill()
    log = "\n".join(run.lines)
    assert (code, run.lines[seen:]) == (MESSAGES[sig][0], [MESSAGES[sig][1]]), log
    assert "Traceback" not in log + run.out, log
    assert not out.exists() and leftovers(out) == [] and not list(out.parent.glob(f".*{TMP_MARK}*")), log


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_during_calibration_leaves_nothing(inputs: dict[str, str], tmp_path: Path, sig) -> None:
    out = tmp_path / "int8"
    argv = ["quantize", inputs["tiny"], "--calib", inputs["text"], "--calib-samples", "20000", "--calib-seq-len",
            "16", "--alpha", "0.5", "--out", str(out)]
    _interrupt(argv, out, sig, when="llmq: calibrating", must_hold=None)


def test_sigterm_after_the_checkpoint_is_written_leaves_nothing(inputs: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "int8"
    argv = ["quantize", inputs["tiny"], "--calib", inputs["text"], "--calib-samples", "4", "--calib-seq-len", "16",
            "--alpha", "0.5", "--out", str(out), "--eval", "--set", f"evaluation.data={inputs['text']}",
            "--set", "evaluation.seq_len=32", "--set", "evaluation.max_tokens=300000"]
    _interrupt(argv, out, signal.SIGTERM, when="checkpoint written to", must_hold="model.safetensors")
