"""The documentation names the library by its faces, never by an old import path.

Old module paths (``adambs_jax._deprecated.OLD_MODULES``) and names the top-level face no
longer exports (``adambs_jax._MOVED``) still work for one release, with a warning; the docs
must not teach them. Only the pages that document the moves may name them: CHANGELOG.md and
the "Moved names" section of docs/api.md.
"""

import pathlib
import re

import pytest

import adambs_jax as ab
from adambs_jax._deprecated import OLD_MODULES

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
OLD_PATH = re.compile(
    r"\badambs_jax\.(?:"
    + "|".join(sorted((re.escape(m.split(".", 1)[1]) for m in OLD_MODULES), key=len, reverse=True))
    + r")\b"
    + r"|\bab\.(?:"
    + "|".join(sorted((re.escape(m.split(".", 1)[1]) for m in OLD_MODULES), key=len, reverse=True))
    + "|"
    + "|".join(sorted(map(re.escape, ab._MOVED), key=len, reverse=True))
    + r")\b"
)


def _text(page: pathlib.Path) -> str:
    text = page.read_text()
    if page.name == "api.md":  # the section that documents the moves
        start = text.index("## Moved names")
        end = text.find("\n## ", start + 1)
        text = text[:start] + (text[end:] if end >= 0 else "")
    return text


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_the_docs_name_no_old_path(page):
    found = [
        f"{page.name}:{number}: {match.group(0)}"
        for number, line in enumerate(_text(page).splitlines(), 1)
        for match in OLD_PATH.finditer(line)
    ]
    assert not found, found


def test_the_pattern_sees_old_paths():
    """Not vacuous: an old module, an old submodule and a moved name are caught, their new
    homes are not."""
    old_paths = ("adambs_jax.exp3.check_state_finite", "ab.sumtree", "ab.probabilities(s)")
    for old in old_paths + ("adambs_jax.ghost", "adambs_jax.train_step"):
        assert OLD_PATH.search(old), old
    for new in ("ab.samplers.probabilities", "adambs_jax.feedback.ghost", "ab.exp3_sampler"):
        assert not OLD_PATH.search(new), new
