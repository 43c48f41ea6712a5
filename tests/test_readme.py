"""The README's API example runs as written."""
import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_api_example_runs(capsys, tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 2, "README has no python example"
    monkeypatch.chdir(tmp_path)  # the examples write files
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    out = capsys.readouterr().out
    assert "def forward" in out
    assert namespace["merged"] is not None and "A" in namespace["runtime"](namespace["x"], ["A"])
    cost = namespace["pamfx"].cost
    assert cost(namespace["lean"]).flops < cost(namespace["merged"]).flops
    for block in blocks[1:]:  # later examples continue the first one, each asserting its own results
        exec(compile(block, "README.md", "exec"), namespace)


def test_readme_setup_matches_ci():
    text = README.read_text()
    ci = (README.parent / ".ci" / "run").read_text()
    assert "python -m pytest -q" in text and "python3 -m pytest -q" in ci
    assert "torch==2.13.0" in text and "torch==2.13.0" in ci


def test_readme_custom_op_rule_example_runs(capsys):
    blocks = [b for b in re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S) if "register_channel_rule" in b]
    assert len(blocks) == 1, "README must show one example registering a channel rule"
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    assert capsys.readouterr().out.strip() == "True"
    x, models, merged = namespace["xs"], namespace["scaled"], namespace["scaled_merged"]
    assert any(type(m).__name__ == "ChannelScale" for m in merged.modules())
    for task, model in models.items():
        assert torch.allclose(merged(x)[task], model(x), atol=1e-6)
