"""``~`` in paths: every path option of ``python -m dia_fast`` and ``DiaTTS.from_pretrained`` expand it alike (a
``--flag=~/x`` gets no expansion from the shell)."""

from __future__ import annotations

import errno
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from dia_fast.cli import _parser, main

FAST = ["--max-new-tokens", "40", "--no-progress", "--seed", "0"]


@pytest.fixture
def home(tmp_path, monkeypatch):
    """HOME is a fresh directory; the current directory another one (where an unexpanded ``~`` would land)."""
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    return home


@pytest.mark.filterwarnings("ignore:no codec checkpoint given")  # (the random EnCodec that is saved)
@pytest.mark.filterwarnings("ignore:.*holds a random codec")  # (and that warns when loaded back)
@pytest.mark.parametrize("quantize", [None, "int8"])
def test_from_pretrained_expands_the_tilde_and_finds_the_checkpoints_codec(home, quantize):
    """A ``~/...`` checkpoint saved with its codec (EnCodec here: 24 kHz, where the default demo DAC is 44.1 kHz)
    loads that codec, and a saved int8 directory loads as it is (not as full-precision weights)."""
    from dia_fast import DiaTTS
    from dia_fast.quantize import quantized_mode

    tts = DiaTTS.random("tiny", seed=3, codec="encodec", quantize=quantize)
    DiaTTS(tts.model, tts.codec).save_pretrained(home / "ckpt")  # (not marked as random weights)
    loaded = DiaTTS.from_pretrained("~/ckpt")
    assert loaded.sample_rate == 24000
    assert quantized_mode(loaded.model) == quantize


@pytest.mark.parametrize(
    "flag", ["--text-file", "--out", "--save-model", "--prompt-wav", "--speaker-file", "--save-speaker"]
)
def test_every_path_option_expands_the_tilde(home, flag):
    args = _parser().parse_args([f"{flag}=~/x"])
    assert getattr(args, flag.lstrip("-").replace("-", "_")) == home / "x"


def _voice(path):
    t = np.arange(44100) / 44100
    sf.write(path, (0.3 * np.sin(2 * np.pi * 180 * t)).astype(np.float32), 44100)


def test_tilde_paths_on_the_command_line(home, capsys):
    """Each path option at ``~/...`` reads and writes in HOME; nothing lands in a ``~`` directory of the cwd."""
    (home / "t.txt").write_text("[S1] Hello from home.", encoding="utf-8")
    _voice(home / "v.wav")
    voice = ["--prompt-wav=~/v.wav", "--prompt-text", "[S1] A voice."]
    rc = main(["--text-file=~/t.txt", *voice, "--save-speaker=~/s.safetensors", "--out=~/a.wav", "--greedy", *FAST])
    assert rc == 0, capsys.readouterr().err
    assert (home / "s.safetensors").is_file() and (home / "a.wav").is_file()
    rc = main(["--text-file=~/t.txt", "--speaker-file=~/s.safetensors", "--out=~/b.wav", "--greedy", *FAST])
    assert rc == 0, capsys.readouterr().err
    assert np.array_equal(sf.read(home / "a.wav")[0], sf.read(home / "b.wav")[0])  # the saved voice, reused
    assert main(["--save-model=~/m"]) == 0
    rc = main(["[S1] Hi.", "--model=~/m", "--out=~/c.wav", *FAST])
    assert rc == 0, capsys.readouterr().err
    assert sf.info(home / "c.wav").frames == (40 - 16) * 512
    assert not (home.parent / "cwd" / "~").exists()


def _feed(fifo: Path, data: bytes, wait_s: float = 30.0) -> None:
    """Write ``data`` into ``fifo`` once a reader has opened it (gives up after ``wait_s`` without one)."""
    end = time.monotonic() + wait_s
    while True:
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # ENXIO while no reader has it open
            break
        except OSError as exc:
            if exc.errno != errno.ENXIO or time.monotonic() > end:
                return
            time.sleep(0.01)
    os.set_blocking(fd, True)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes here")
def test_text_file_reads_a_pipe_and_a_directory_is_named_as_one(tmp_path, capsys):
    """--text-file reads what is not a regular file (a named pipe, as /dev/stdin and a shell's <(...) are) and speaks
    it as the same text given as an argument; a directory is said to be one (for --prompt-wav too)."""
    text = "[S1] Hello from a pipe."
    fifo = tmp_path / "text.fifo"
    os.mkfifo(fifo)
    writer = threading.Thread(target=_feed, args=(fifo, text.encode()), daemon=True)
    writer.start()
    rc = main(["--text-file", str(fifo), "--out", str(tmp_path / "pipe.wav"), *FAST])
    assert rc == 0, capsys.readouterr().err
    writer.join(timeout=5)
    assert main([text, "--out", str(tmp_path / "arg.wav"), *FAST]) == 0
    assert np.array_equal(sf.read(tmp_path / "pipe.wav")[0], sf.read(tmp_path / "arg.wav")[0])
    capsys.readouterr()
    for args, message in (
        (["--text-file", str(tmp_path)], f"--text-file {tmp_path} is a directory, not a file"),
        (["[S1] Hi.", "--prompt-wav", str(tmp_path)], f"--prompt-wav {tmp_path} is a directory, not a file"),
        (["--text-file", str(tmp_path / "none.txt")], f"text file not found: {tmp_path / 'none.txt'}"),
    ):
        assert main([*args, "--out", str(tmp_path / "x.wav"), *FAST]) == 2
        assert capsys.readouterr().err.strip() == f"dia_fast: error: {message}", args
