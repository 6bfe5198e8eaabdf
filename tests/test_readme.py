"""The README's usage block is a complete program: run it exactly as printed."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_readme_usage_runs_as_printed(capsys):
    text = (ROOT / "README.md").read_text()
    usage = text[text.index("## Usage") :]
    blocks = re.findall(r"```python\n(.*?)```", usage, flags=re.S)
    assert blocks, "README's Usage section has no python block"
    exec(compile(blocks[0], "README.md", "exec"), {"__name__": "readme"})
    printed = capsys.readouterr().out
    loss = float(re.search(r"loss ([0-9.]+) \(unbiased\)", printed).group(1))
    assert loss < 1.0  # trained: the initial loss is about log(4) = 1.39


def test_readme_keep_your_own_loop_runs_as_printed(capsys):
    """The hand loop of docs/porting.md's optax port (ab.value_and_grad, ab.Sampling)."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Keep your own loop") : text.index("## What to know")]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "README's Keep your own loop section has one python block"
    exec(compile(blocks[0], "README.md", "exec"), {"__name__": "readme"})
    printed = capsys.readouterr().out
    loss = float(re.search(r"loss ([0-9.]+) \(unbiased\)", printed).group(1))
    assert loss < 1.0  # trained: the initial loss is about log(4) = 1.39
