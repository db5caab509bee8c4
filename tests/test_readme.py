"""The README's examples run as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).parents[1] / "README.md"


def _example(name: str) -> str:
    text = README.read_text(encoding="utf-8")
    match = re.search(rf"<!-- readme-example: {name} -->\s*```python\n(.*?)```", text, re.S)
    assert match, f"README example {name!r} not found"
    return match.group(1)


def test_async_voice_pool_example_runs(tmp_path, monkeypatch, capsys):
    import soundfile as sf

    monkeypatch.chdir(tmp_path)
    exec(compile(_example("async"), "README.md", "exec"), {"__name__": "__readme__"})
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 5
    batched, total = (int(w) for w in printed[4].split()[:3:2])  # "N of M decode steps ran more than one request"
    assert 0 < batched <= total  # the four conversations really shared decode steps
    for i in range(4):
        info = sf.info(tmp_path / f"line{i}.wav")
        assert info.samplerate == 44100 and info.frames > 0
    assert (tmp_path / "alice.safetensors").is_file()
