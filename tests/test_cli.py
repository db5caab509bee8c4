"""``python -m dia_fast``: the demo run, checkpoints, voice cloning and one-line errors."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from dia_fast.cli import demo_max_new_tokens, main

FAST = ["--max-new-tokens", "40", "--no-progress", "--seed", "0"]


def _run(capsys, *args: str) -> tuple[int, str, str]:
    rc = main([*args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_demo_writes_a_real_wav(tmp_path, capsys):
    out = tmp_path / "hello.wav"
    rc, stdout, err = _run(capsys, "[S1] Hello there. [S2] Hi!", "--out", str(out), "--json", *FAST)
    assert rc == 0, err
    assert "random-weight" in err  # the demo says what it is
    data, rate = sf.read(out, dtype="float32")
    info = sf.info(out)
    assert rate == 44100 and info.subtype == "PCM_16" and data.ndim == 1
    assert data.shape[0] == (40 - 16) * 512  # max_new_tokens - 16 frames of 512 samples
    assert np.isfinite(data).all() and np.abs(data).max() > 0
    summary = json.loads(stdout)
    assert summary["out"] == str(out) and summary["demo_model"] and summary["sample_rate"] == 44100


@pytest.mark.parametrize("flag", ["--model", "--codec", "--out", "--save-model", "--prompt-wav", "--text-file"])
def test_an_empty_path_is_an_error_not_the_current_directory(capsys, flag):
    with pytest.raises(SystemExit) as exit_:
        main(["[S1] Hi.", flag, ""])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and flag in err and "empty value" in err and len(err.strip().splitlines()) == 1, err


def test_a_text_file_with_a_byte_order_mark_and_the_rate_an_opus_file_is_written_at(tmp_path, capsys):
    """The BOM some editors write is not text (no "does not start with [S1]" warning); the summary gives the rate
    the file holds (Opus takes 48 kHz, not the codec's 44.1 kHz)."""
    text = tmp_path / "bom.txt"
    text.write_bytes("\ufeff[S1] Hello from a file.".encode())
    out = tmp_path / "o.opus"
    rc, stdout, err = _run(capsys, "--text-file", str(text), "--out", str(out), "--json", *FAST)
    assert rc == 0, err
    assert "warning" not in err
    assert json.loads(stdout)["sample_rate"] == sf.info(out).samplerate == 48000
    assert "at 48000 Hz" in err


def test_loudness_sample_rate_and_float_output(tmp_path, capsys):
    from dia_fast.audio import integrated_loudness

    out = tmp_path / "x.wav"
    # seed 1: the random demo model speaks for 0.74 s (> 400 ms: the loudness gate applies)
    longer = ["--max-new-tokens", "80", "--no-progress", "--seed", "1"]
    rc, _, err = _run(capsys, "[S1] Loud enough.", "--out", str(out), "--loudness", "-20", "--float", *longer)
    assert rc == 0, err
    data, rate = sf.read(out, dtype="float32")
    assert data.shape[0] >= 0.4 * rate, "the premise: audio longer than the 400 ms gating block"
    assert sf.info(out).subtype == "FLOAT"
    assert np.abs(data).max() <= 10 ** (-1 / 20) + 1e-6  # the peak ceiling holds
    level = integrated_loudness(data, rate)
    assert level <= -20 + 0.5  # at the target, or below it when the peak ceiling limited the gain
    native = tmp_path / "native.wav"
    rc, _, err = _run(capsys, "[S1] Resampled.", "--out", str(native), "--no-loudness", *FAST)
    assert rc == 0, err
    rc, _, err = _run(capsys, "[S1] Resampled.", "--out", str(out), "--sample-rate", "16000", "--no-loudness", *FAST)
    assert rc == 0, err
    data, rate = sf.read(out)
    n_native = sf.info(native).frames  # the same seed: the same audio at 44.1 kHz
    assert n_native > 0 and rate == 16000 and abs(data.shape[0] - n_native * 16000 / 44100) <= 2


def test_default_length_of_the_demo_follows_the_text(tmp_path, capsys):
    out = tmp_path / "d.wav"
    rc, _, err = _run(capsys, "[S1] Short.", "--out", str(out), "--no-progress", "--greedy", "-q")
    assert rc == 0, err
    assert err == ""  # --quiet
    frames = sf.info(out).frames // 512
    # ~11 characters at 14 characters per second + 1 s, held to that length (min_new_tokens): the random model
    # would stop anywhere otherwise
    steps = demo_max_new_tokens("[S1] Short.", 44100 / 512, 15, 3071)
    assert frames == steps - 16
    free = tmp_path / "free.wav"
    rc, _, err = _run(
        capsys, "[S1] Short.", "--out", str(free), "--no-progress", "--greedy", "-q", "--min-new-tokens", "0"
    )
    assert rc == 0, err
    assert 0 < sf.info(free).frames // 512 <= steps - 16
    assert demo_max_new_tokens("x" * 140, 86.0, 15, 3071) == 11 * 86 + 16
    assert demo_max_new_tokens("x" * 100000, 86.0, 15, 3071) == 3071  # capped by the audio budget


def test_checkpoint_directory_with_its_codec(tmp_path, capsys):
    from dia_fast import DiaTTS

    tts = DiaTTS.random("tiny", seed=2)
    tts = DiaTTS(tts.model, tts.codec)  # weights of one's own: not marked as a random demo model when saved
    tts.save_pretrained(tmp_path / "ckpt", layout="official")
    tts.codec.save_pretrained(tmp_path / "ckpt" / "dac")
    out = tmp_path / "c.wav"
    rc, _, err = _run(capsys, "[S1] From a checkpoint.", "--model", str(tmp_path / "ckpt"), "--out", str(out), *FAST)
    assert rc == 0, err
    # the model's weights are its own (not a demo model's); the codec saved is the demo's random one, which says so
    assert "holds random weights" not in err and "random-weight" not in err
    assert "holds a random codec" in err
    assert sf.info(out).frames == 24 * 512


def _voice_file(path: Path) -> Path:
    t = np.arange(int(48000 * 0.8)) / 48000
    stereo = np.stack([0.3 * np.sin(2 * np.pi * 150 * t), 0.3 * np.sin(2 * np.pi * 220 * t)], 1)
    sf.write(path, stereo.astype(np.float32), 48000)
    return path


def test_voice_cloning_and_saved_speaker_give_the_same_audio(tmp_path, capsys):
    voice = _voice_file(tmp_path / "voice.wav")
    common = ["--greedy", "--no-loudness", *FAST]
    a, b = tmp_path / "a.wav", tmp_path / "b.wav"
    spk = tmp_path / "voice.safetensors"
    rc, _, err = _run(
        capsys,
        "[S1] New words.",
        "--prompt-wav",
        str(voice),
        "--prompt-text",
        "[S1] The prompt.",
        "--save-speaker",
        str(spk),
        "--out",
        str(a),
        *common,
    )
    assert rc == 0, err
    assert spk.is_file()
    rc, _, err = _run(capsys, "[S1] New words.", "--speaker-file", str(spk), "--out", str(b), *common)
    assert rc == 0, err
    assert np.array_equal(sf.read(a)[0], sf.read(b)[0])


def test_untagged_transcript_is_spoken_alike_with_or_without_a_saved_speaker(tmp_path, capsys):
    voice = _voice_file(tmp_path / "voice.wav")
    common = ["[S1] New words.", "--prompt-wav", str(voice), "--prompt-text", "The prompt.", "--greedy"]
    common += ["--no-loudness", *FAST]
    plain, saved, reused = tmp_path / "plain.wav", tmp_path / "saved.wav", tmp_path / "reused.wav"
    spk = tmp_path / "voice.safetensors"
    assert _run(capsys, *common, "--out", str(plain))[0] == 0
    assert _run(capsys, *common, "--save-speaker", str(spk), "--out", str(saved))[0] == 0
    rc, _, err = _run(capsys, "[S1] New words.", "--speaker-file", str(spk), "--out", str(reused), *common[5:])
    assert rc == 0, err
    audio = sf.read(plain)[0]
    assert np.array_equal(audio, sf.read(saved)[0]) and np.array_equal(audio, sf.read(reused)[0])


@pytest.mark.parametrize(
    "args, message",
    [
        ([""], "text is empty"),
        ([], "no text given"),
        (["[S1] hi", "--prompt-wav", "missing.wav"], "prompt audio not found"),
        (["[S1] hi", "--prompt-text", "[S1] x"], "--prompt-text needs --prompt-wav"),
        (["[S1] hi", "--speaker-file", "s.safetensors", "--prompt-text", "[S1] x"], "--prompt-text needs --prompt-wav"),
        (["[S1] hi", "--prompt-wav", "v.wav", "--prompt-text", " ", "--save-speaker", "s"], "--save-speaker needs"),
        (["[S1] hi", "--loudness", "5"], "--loudness must be between"),
        (["[S1] hi", "--model", "no/such/dir/anywhere"], "checkpoint not found"),
        (["[S1] hi", "--max-new-tokens", "5"], "max_new_tokens=5 is too small"),
        (["[S1] hi", "--out", "/no/such/dir/x.wav"], "--out: directory does not exist"),
        (["[S1] hi", "--out", "/proc/x.wav"], "--out: cannot write in /proc"),  # (as root too: a file is tried)
        (["[S1] hi", "--temperature", "-1"], "temperature"),
        (["[S1] hi", "--out", "x.aiff"], "supported are wav, flac, ogg, opus, mp3"),
        (["[S1] hi", "--out", "."], "--out is a directory"),
        (["[S1] hi", "--out", "x.mp3", "--float"], "--float writes WAV only"),
        (["[S1] hi", "--quantize", "fp8", "--device", "cpu"], "quantize=fp8 has no CPU kernel"),
        (["[S1] hi", "--threads", "0"], "--threads must be >= 1"),
        (["[S1] hi", "--crossfade-ms", "nan"], "--crossfade-ms must be a finite number >= 0, got nan"),
        (["[S1] hi", "--threads", "100000"], "is more than 4x this machine's"),
        (["[S1] hi", "--temperature", "1e39"], "temperature must be a finite number >= 0 (at most 3.4e+38)"),
        (["[S1] hi", "--temperature", "1e-40"], "temperature must be 0 (greedy) or at least 1e-06, got 1e-40"),
        (["[S1] hi", "--out", "x.mp3", "--sample-rate", "96000"], "--sample-rate 96000: mp3 takes 8000,"),
        (["[S1] hi", "--out", "x.ogg", "--sample-rate", "384000"], "--sample-rate 384000: ogg takes up to 192000 Hz"),
        (["--text-file", "latin1.txt"], "--text-file latin1.txt is not UTF-8 text"),
        (["[S1] hi", "--model", "badcfg"], "badcfg/config.json: unrecognised config format"),
        (["[S1] hi", "--min-new-tokens", "-1"], "min_new_tokens must be >= 0"),
        (["--save-model", "/no/such/dir/q8"], "--save-model: directory does not exist"),
        (["--save-model", "file.txt"], "--save-model must be a directory"),
        (["--model", ".", "--save-model", "."], "is the --model checkpoint"),
        (["--save-model", "q8", "--prompt-wav", "v.wav"], "--prompt-wav needs text to speak"),
        (["--save-model", "q8", "--threads", "0"], "--threads must be >= 1"),
        # save-only mode: what only speaking uses is an error, even at its default value
        (["--save-model", "q8", "--out", "out.wav"], "--out needs text to speak"),
        (["--save-model", "q8", "--cfg-scale", "3.0", "--float"], "--cfg-scale, --float need text to speak"),
        # outputs that would overwrite an input or each other (v.wav, ck/ and codec/ exist)
        (["[S1] hi", "--prompt-wav", "v.wav", "--out", "v.wav"], "would overwrite the --prompt-wav input"),
        (["[S1] hi", "--prompt-wav", "v.wav", "--prompt-text", "[S1] x", "--save-speaker", "v.wav"], "--prompt-wav"),
        (
            [
                "[S1] hi",
                "--prompt-wav",
                "v.wav",
                "--prompt-text",
                "[S1] x",
                "--save-speaker",
                "o.wav",
                "--out",
                "o.wav",
            ],
            "--out and --save-speaker are the same file",
        ),  # fmt: skip
        (["[S1] hi", "--model", "ck", "--out", "ck/old.wav"], "would overwrite the --model input"),
        (["--codec", "codec", "--save-model", "codec"], "is the --codec checkpoint"),
        (["--model", "ck", "--save-model", "ck/dac"], "is inside the --model checkpoint"),
        (["--model", "ck/model.safetensors", "--save-model", "ck"], "would overwrite the --model input"),
        (
            ["--text-file", "t.txt", "--save-model", "m", "--out", "m/config.json", "--format", "wav"],
            "is where --save-model writes",
        ),  # fmt: skip
    ],
)
def test_user_errors_are_one_line_and_exit_2(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file.txt").write_text("not a directory")
    (tmp_path / "t.txt").write_text("[S1] Hello.")
    (tmp_path / "latin1.txt").write_bytes("[S1] Café.".encode("latin-1"))
    (tmp_path / "badcfg").mkdir()
    (tmp_path / "badcfg" / "config.json").write_text("{}")
    (tmp_path / "badcfg" / "model.safetensors").write_bytes(b"")
    (tmp_path / "v.wav").write_bytes(b"a voice")
    for d in ("ck/dac", "codec", "m"):
        (tmp_path / d).mkdir(parents=True)
    for f in ("ck/model.safetensors", "ck/config.json", "ck/old.wav"):
        (tmp_path / f).write_bytes(b"weights")
    rc, _, err = _run(capsys, *args, "--no-progress")
    assert rc == 2
    lines = [line for line in err.splitlines() if line.startswith("dia_fast: error:")]
    assert len(lines) == 1 and message in lines[0], err
    assert sorted(p.name for p in tmp_path.glob("*.wav")) == ["v.wav"]  # nothing half-written
    assert (tmp_path / "v.wav").read_bytes() == b"a voice" and (tmp_path / "ck/old.wav").read_bytes() == b"weights"


def test_save_model_writes_a_quantized_directory_that_speaks_as_the_model_did(tmp_path, capsys):
    """``--quantize int8 --save-model DIR`` without text only saves; with text it saves and speaks. The saved
    directory loads back int8 (not quantized again), still a random demo model (it says so, and is held to the
    text's length as the demo is), and speaks the same audio as the model it was saved from."""
    from dia_fast.quantized_dir import read_quantization

    saved = tmp_path / "q8"
    rc, stdout, err = _run(capsys, "--quantize", "int8", "--save-model", str(saved), "--json")
    assert rc == 0, err
    summary = json.loads(stdout)
    assert {k: summary[k] for k in ("demo_model", "device", "saved_model", "quantize")} == {
        "demo_model": True,
        "device": "cpu",
        "saved_model": str(saved),
        "quantize": "int8",
    }
    assert summary["save_s"] >= 0
    assert read_quantization(saved)["mode"] == "int8" and not list(tmp_path.glob("*.wav"))
    direct, again = tmp_path / "direct.wav", tmp_path / "again.wav"
    save_b = ["--save-model", str(tmp_path / "q8b")]
    rc, stdout, err = _run(capsys, "[S1] Hi.", "--quantize", "int8", *save_b, "--out", str(direct), *FAST)
    assert rc == 0, err
    assert read_quantization(tmp_path / "q8b")["mode"] == "int8"
    rc, stdout, err = _run(capsys, "[S1] Hi.", "--model", str(saved), "--out", str(again), "--json", *FAST)
    assert rc == 0, err
    assert f"dia_fast: warning: {saved} holds random weights" in err
    assert json.loads(stdout)["demo_model"]
    assert sf.info(again).frames == (40 - 16) * 512  # held to its length, as the demo is
    assert np.array_equal(sf.read(direct)[0], sf.read(again)[0])


def test_python_dash_m_entry_point(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "python"), *sys.path])}
    out = tmp_path / "m.wav"
    proc = subprocess.run(
        [sys.executable, "-m", "dia_fast", "[S1] Hi.", "--out", str(out), *FAST],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert sf.info(out).samplerate == 44100
    bad = subprocess.run([sys.executable, "-m", "dia_fast", ""], capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("dia_fast: error: text is empty")


def test_long_text_is_spoken_in_chunks(tmp_path, capsys):
    sentence = "[S1] This sentence is one of many in a long text. [S2] And this is the answer to it. "
    text_file = tmp_path / "long.txt"
    text_file.write_text(sentence * 14, encoding="utf-8")  # > 1024 bytes
    out = tmp_path / "long.wav"
    rc, _, err = _run(capsys, "--text-file", str(text_file), "--out", str(out), *FAST)
    assert rc == 0, err
    assert "chunks" in err
    n = int(err.split("speaking it in ")[1].split(" chunks")[0])
    assert n >= 2
    # each chunk: 24 frames of 512 samples, joined with 40 ms crossfades
    fade = round(0.040 * 44100)
    assert sf.info(out).frames == n * 24 * 512 - (n - 1) * fade


def test_checkpoint_written_by_transformers_save_pretrained(tmp_path, capsys, monkeypatch):
    from dia_fast.config import DiaConfig

    from .hf_reference import hf_dia

    hf_dia(DiaConfig.preset("tiny"), seed=4).save_pretrained(tmp_path / "hf")
    monkeypatch.chdir(tmp_path)
    rc, _, err = _run(
        capsys, "[S1] Hello.", "--checkpoint", str(tmp_path / "hf"), "--max-tokens", "40", "--no-progress"
    )
    assert rc == 0, err
    assert "demonstration" in err  # no codec in that directory: the random demo DAC, said out loud
    assert sf.info(tmp_path / "out.wav").samplerate == 44100  # the default output name


def test_encodec_codec_with_a_voice_prompt(tmp_path, capsys):
    voice = _voice_file(tmp_path / "voice.wav")  # 48 kHz stereo: resampled to 24 kHz mono for EnCodec
    out = tmp_path / "e.wav"
    rc, _, err = _run(
        capsys,
        "[S1] With EnCodec.",
        "--codec",
        "encodec",
        "--prompt-wav",
        str(voice),
        "--prompt-text",
        "[S1] The prompt.",
        "--out",
        str(out),
        "--no-loudness",
        *FAST,
    )
    assert rc == 0, err
    info = sf.info(out)
    assert info.samplerate == 24000 and info.frames == 24 * 320


@pytest.mark.parametrize(
    ("name", "fmt", "subtype", "rate"),
    [
        ("x.wav", "WAV", "PCM_16", 44100),
        ("x.flac", "FLAC", "PCM_16", 44100),
        ("x.ogg", "OGG", "VORBIS", 44100),
        ("x.opus", "OGG", "OPUS", 48000),  # Opus takes 48 kHz (and a few lower rates): resampled
        ("x.mp3", "MP3", "MPEG_LAYER_III", 44100),
    ],
)
def test_the_extension_picks_the_container(tmp_path, capsys, name, fmt, subtype, rate):
    out = tmp_path / name
    rc, _, err = _run(capsys, "[S1] Hello there.", "--out", str(out), *FAST)
    assert rc == 0, err
    info = sf.info(out)
    assert (info.format, info.subtype, info.samplerate) == (fmt, subtype, rate)
    assert abs(info.duration - (40 - 16) * 512 / 44100) < 0.06


def test_format_flag_overrides_the_extension(tmp_path, capsys):
    out = tmp_path / "speech.audio"
    rc, _, err = _run(capsys, "[S1] Hello there.", "--out", str(out), "--format", "flac", *FAST)
    assert rc == 0, err
    assert sf.info(out).format == "FLAC"


def test_any_int_is_a_seed(tmp_path, capsys):
    """Seeds beyond 64 bits are reduced modulo 2**64 (the same audio as the reduced seed), not an overflow."""
    big, reduced, other = tmp_path / "big.wav", tmp_path / "reduced.wav", tmp_path / "other.wav"
    for seed, out in ((2**70 + 5, big), (5, reduced), (6, other)):
        rc, _, err = _run(capsys, "[S1] Hello there.", "--out", str(out), *FAST, "--seed", str(seed))
        assert rc == 0, err
    assert big.read_bytes() == reduced.read_bytes() != other.read_bytes()


def test_an_unwritable_output_names_the_users_path(tmp_path, capsys, monkeypatch):
    from dia_fast import audio

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(audio.io.os, "fsync", disk_full)
    out = tmp_path / "x.wav"
    rc, _, err = _run(capsys, "[S1] Hello there.", "--out", str(out), *FAST)
    assert rc == 2 and f"cannot write {out}: No space left on device" in err and ".tmp" not in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 2  # the demo's note and the error
    assert not list(tmp_path.iterdir())  # no temporary file left behind


def test_save_speaker_is_checked_before_any_work(tmp_path, capsys):
    voice = _voice_file(tmp_path / "v.wav")
    for target, message in (
        (tmp_path, "--save-speaker is a directory"),
        (tmp_path / "no" / "s.safetensors", "directory does not exist"),
    ):
        rc, _, err = _run(
            capsys,
            "[S1] Hello there.",
            "--prompt-wav",
            str(voice),
            "--prompt-text",
            "[S1] A voice.",
            "--save-speaker",
            str(target),
            "--out",
            str(tmp_path / "x.wav"),
            *FAST,
        )
        assert rc == 2 and message in err, err
    assert not (tmp_path / "x.wav").exists()


def test_a_speech_that_max_new_tokens_ends_warns(tmp_path, capsys):
    from .test_api import _short_budget_tts

    checkpoint = _short_budget_tts().save_pretrained(tmp_path / "ck")
    base = ["[S1] Hello friend.", "--model", str(checkpoint), "--out", str(tmp_path / "o.wav"), "--greedy"]
    rc, _, err = _run(capsys, *base, "--max-new-tokens", "100", "--no-progress")
    assert rc == 0 and "ended the speech" not in err, err  # the model ends it (its codec is random: that warns)
    rc, _, err = _run(capsys, *base, "--max-new-tokens", "100", "--min-new-tokens", "84", "--no-progress")
    assert rc == 0 and "--max-new-tokens 100 ended the speech before the model did" in err, err


def _stdin(monkeypatch, data: bytes) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8"))


def test_stdin_is_read_as_a_text_file_is(tmp_path, capsys, monkeypatch):
    """'-' reads stdin's bytes as --text-file reads a file: UTF-8, a byte-order mark dropped (the demo's length
    follows the text: the same audio as the text given as an argument, and no "does not start with [S1]" warning);
    bytes that are not UTF-8 are an error naming stdin and the byte, before the model loads."""
    common = ["--greedy", "--no-progress"]
    arg, piped = tmp_path / "arg.wav", tmp_path / "piped.wav"
    assert _run(capsys, "[S1] Hello from stdin.", "--out", str(arg), *common)[0] == 0
    _stdin(monkeypatch, b"\xef\xbb\xbf[S1] Hello from stdin.")
    rc, _, err = _run(capsys, "-", "--out", str(piped), *common)
    assert rc == 0 and "warning" not in err, err
    assert np.array_equal(sf.read(arg)[0], sf.read(piped)[0])
    for data, reason in (
        (b"[S1] Caf\xe9.", "invalid continuation byte"),
        (b"\xef\xbb\xbf[S1] \xff", "invalid start byte"),
    ):
        _stdin(monkeypatch, data)
        rc, _, err = _run(capsys, "-", "--out", str(tmp_path / "bad.wav"), *common)
        assert rc == 2 and err == f"dia_fast: error: stdin is not UTF-8 text ({reason} at byte 8)\n", err


def test_each_chunk_of_a_long_demo_text_has_its_own_length(tmp_path, capsys):
    """The demo's length rule (~14 characters per second + 1 s) holds for each chunk of a long text: a short chunk is
    not held to a long one's length."""
    first = "[S1] " + " ".join(["This is one sentence of the first turn."] * 6)  # 239 spoken characters
    text = first + " [S2] Yes."  # 244: over a chunk's 240 (12 characters per second, 20 s)
    out = tmp_path / "two.wav"
    rc, _, err = _run(capsys, text, "--out", str(out), "--no-progress", "--seed", "0")
    assert rc == 0 and "speaking it in 2 chunks" in err, err
    expected = (len(first) / 14 + 1) + (len("[S2] Yes.") / 14 + 1) - 0.040  # joined with a 40 ms crossfade
    assert abs(sf.info(out).duration - expected) < 0.05


def test_a_prompt_that_leaves_too_little_audio_for_the_text_is_an_error_about_the_prompt(tmp_path, capsys):
    """A prompt within the model's prompt limit that leaves too little audio to speak the text: the error says the
    prompt is too long and how long it may be (not that a word of the text does not fit)."""
    import torch

    from dia_fast import DiaTTS
    from dia_fast.voice import CustomSpeaker, codec_description

    tts = DiaTTS.random("tiny")

    def speaker(frames: int) -> str:
        path = tmp_path / f"{frames}.safetensors"
        codes = torch.zeros(frames, tts.config.data.channels, dtype=torch.long)
        CustomSpeaker(codes, "[S1] A voice.", codec_description(tts.codec)).save(path)
        return str(path)

    # "Hi": 2 spoken characters at 12 per second need 1/6 s, 15 frames at 44100/512 per second; the 3071 steps
    # after BOS less the delay pattern's 16 leave 3055 frames: a prompt of at most 3040 frames (35.29 s)
    base = ["[S1] Hi", "--out", str(tmp_path / "hi.wav"), "--no-progress", "--greedy"]
    rc, _, err = _run(capsys, *base, "--speaker-file", speaker(3041))
    assert rc == 2 and "the audio prompt is too long for this text" in err and "at most 35.2 s" in err, err
    rc, _, err = _run(capsys, *base, "--speaker-file", speaker(3040))
    assert rc == 0, err


@pytest.mark.parametrize(
    ("module", "args", "start"),
    [
        ("dia_fast", ["[S1] Hi.", "--threads", "abc"], "dia_fast: error: argument --threads: invalid int value"),
        ("dia_fast", ["[S1] Hi.", "--no-such-flag"], "dia_fast: error: unrecognized arguments: --no-such-flag"),
        ("dia_fast.bench", ["--batch", "x"], "dia_fast.bench: error: argument --batch"),
        ("dia_fast.serve", ["--port", "abc"], "dia_fast.serve: error: argument --port: invalid int value"),
    ],
)
def test_argparse_mistakes_are_one_line_too(module, args, start):
    """What argparse itself refuses (a bad type, an unknown flag) is one line and exit 2, in every program, as their
    own checks are (not argparse's usage block)."""
    r = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(start) and lines[0].endswith("(see --help)"), r.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--top-p", "2"], "top_p must be in (0, 1]"),
        (["--temperature", "1e39"], "temperature must be a finite number >= 0"),
        (["--cfg-filter-top-k", "0"], "cfg_filter_top_k must be >= 1"),
        (["--max-new-tokens", "5"], "max_new_tokens=5 is too small"),
        (["--max-new-tokens", "99999"], "exceeds the model's audio length"),
        (["--min-new-tokens", "40", "--max-new-tokens", "40"], "min_new_tokens must be in [0, max_new_tokens - 16]"),
        # no --max-new-tokens: the error names the option given (3072 positions less BOS and 16 delay steps)
        (["--min-new-tokens", "3056"], "--min-new-tokens must be at most 3055"),
    ],
)
def test_generation_options_are_checked_before_the_model_loads(tmp_path, capsys, args, message):
    """Against the checkpoint's config.json, before its weights are read: a checkpoint whose weights file is garbage
    still gets the option's error (loading it would fail first otherwise)."""
    from dia_fast import DiaTTS

    ck = DiaTTS.random("tiny", seed=0).save_pretrained(tmp_path / "ck", save_codec=False)
    (ck / "model.safetensors").write_bytes(b"not weights")
    rc, _, err = _run(capsys, "[S1] Hello there.", "--model", str(ck), "--out", str(tmp_path / "o.wav"), *args)
    assert rc == 2 and "dia_fast: error:" in err and message in err, err
    rc, _, err = _run(capsys, "[S1] Hello there.", "--out", str(tmp_path / "o.wav"), *args)  # the demo model too
    assert rc == 2 and message in err and "random-weight" not in err, err  # (before the demo is built)


def test_a_min_new_tokens_longer_than_the_demos_text_lengthens_it(tmp_path, capsys):
    """The demo's length follows its text (here ~1.6 s: about 150 steps); a larger --min-new-tokens, without
    --max-new-tokens, makes room for itself after the delay pattern: 200 codec frames of audio."""
    from dia_fast import DiaTTS

    out = tmp_path / "o.wav"
    rc, _, err = _run(capsys, "[S1] Hi.", "--min-new-tokens", "200", "--out", str(out), "--no-progress", "--seed", "0")
    assert rc == 0, err
    audio, rate = sf.read(out)
    frame_rate = DiaTTS.random("tiny", seed=0).codec.frame_rate
    assert audio.shape[0] / rate == pytest.approx(200 / frame_rate, abs=1e-3)


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["[S1] Please speak this.", "--out", "x.wav"], "the text, --out"),
        (["--text-file", "t.txt"], "--text-file"),
        (["--max-tokens", "40", "-q"], "--max-new-tokens, --quiet"),
    ],
)
def test_info_with_text_or_other_options_is_an_error(tmp_path, capsys, monkeypatch, args, named):
    """--info only prints: whatever else is given would be ignored (no audio written), so it is a one-line error."""
    monkeypatch.chdir(tmp_path)
    rc, out, err = _run(capsys, *args, "--info")
    assert (
        rc == 2
        and out == ""
        and err.strip().splitlines()
        == [f"dia_fast: error: --info only prints; it takes no text and no other option: {named}"]
    ), err
    assert list(tmp_path.iterdir()) == []
    rc, out, _ = _run(capsys, "--info")
    assert rc == 0 and json.loads(out)["version"]


def test_a_warning_from_outside_dia_fast_says_where_it_came_from(tmp_path):
    """On the H200 the bench printed torchao's own SyntaxWarning as "dia_fast.bench: warning: invalid escape
    sequence" (it read as dia_fast's); a warning raised in a dependency now names its file, dia_fast's own do not."""
    import dia_fast
    from dia_fast.cliparse import warning_line

    ours = str(Path(dia_fast.__file__).parent / "api.py")
    assert warning_line("dia_fast", "the audio is not speech", ours, 12) == "dia_fast: warning: the audio is not speech"
    theirs = tmp_path / "torchao" / "quant_api.py"
    got = warning_line("dia_fast.bench", "invalid escape sequence '\\.'", str(theirs), 1542)
    assert got == "dia_fast.bench: warning: invalid escape sequence '\\.' (from torchao/quant_api.py:1542)"
    assert warning_line("dia_fast", "x", None, None) == "dia_fast: warning: x"
    # through the bench's handler, as a dependency raises it
    import warnings

    from dia_fast.bench import one_line_warnings

    err = io.StringIO()
    with one_line_warnings(), warnings.catch_warnings():
        warnings.simplefilter("always")
        old, sys.stderr = sys.stderr, err
        try:
            warnings.warn_explicit("deprecated", DeprecationWarning, str(theirs), 7)
        finally:
            sys.stderr = old
    assert err.getvalue() == "dia_fast.bench: warning: deprecated (from torchao/quant_api.py:7)\n"
