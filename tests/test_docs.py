"""The documentation cannot drift from the code: the config reference is generated, the README
keeps its two set-up commands and its size, every relative link resolves, and the measured
augmentation leak is quoted with one figure."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from brainmets.config import AugmentConfig, reference_page
from brainmets.config import main as config_main
from brainmets.data.augment import class_dependent_warning

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, ROOT / "CHANGELOG.md", *DOCS]

# The README's contract: a fresh clone runs the demo, or the whole suite, with one line each
# (.ci/run runs the second verbatim).
DEMO_COMMAND = (
    "python3 -m venv .venv && . .venv/bin/activate && pip install -q torch==2.14.1 "
    "torchvision==0.29.1 -e . && brainmets demo"
)
TEST_COMMAND = (
    "python3 -m venv .venv && . .venv/bin/activate && pip install -q torch==2.14.1 "
    "torchvision==0.29.1 -e '.[test]' && python -m pytest"
)
# The contract allows 350 lines; the aim is 300, and 320 keeps room for a fix without a cut.
README_MAX_LINES = 320
# Without a GPU: the same pins from PyTorch's CPU index (about 1 GB instead of the CUDA build's
# 6), right after the first command. CI cannot run it: that index is out of its reach.
CPU_DEMO_COMMAND = (
    "python3 -m venv .venv && . .venv/bin/activate && pip install -q torch==2.14.1 "
    "torchvision==0.29.1 --index-url https://download.pytorch.org/whl/cpu && pip install -q -e . "
    "&& brainmets demo"
)

_FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
_CODE_SPAN = re.compile(r"`[^`\n]*`")
_INLINE_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_REFERENCE_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?([^\s>]+)>?")
_HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)


def _prose(text: str) -> str:
    """Markdown without code blocks and code spans, where a bracket is no link."""
    return _CODE_SPAN.sub("", _FENCE.sub("", text))


def _links(text: str) -> list[str]:
    prose = _prose(text)
    links = _INLINE_LINK.findall(prose)
    # A reference definition ("[name]: target") cannot interrupt a paragraph: it follows a
    # blank line or another definition, else "[0.37, 1.33]: a range" would be one.
    after_break = True
    for line in prose.splitlines():
        definition = _REFERENCE_LINK.match(line)
        if definition and after_break:
            links.append(definition.group(1))
        after_break = not line.strip() or (definition is not None and after_break)
    return links


def _anchors(text: str) -> set[str]:
    """The heading anchors GitHub renders: lower case, punctuation dropped, spaces as hyphens,
    a repeated heading numbered -1, -2, ..."""
    seen: dict[str, int] = {}
    anchors = set()
    for heading in _HEADING.findall(_FENCE.sub("", text)):
        heading = re.sub(r"<[^>]+>", "", heading)  # inline HTML such as <!-- ... -->
        heading = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text only
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def _broken_links(page: Path) -> list[str]:
    broken = []
    for target in _links(page.read_text()):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(f"{target} (no file {linked})")
        elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked.read_text()):
            broken.append(f"{target} (no heading #{anchor} in {linked.name})")
    return broken


def test_config_reference_is_the_generated_text(capsys):
    """docs/config.md is what `python -m brainmets.config --markdown` prints, byte for byte."""
    assert config_main(["--markdown"]) == 0
    printed = capsys.readouterr().out
    assert printed == reference_page()
    committed = (ROOT / "docs" / "config.md").read_text()
    assert committed == printed, (
        "docs/config.md is out of date: python -m brainmets.config --markdown > docs/config.md"
    )


def test_config_reference_lists_every_key():
    from brainmets.config import reference_rows

    page = (ROOT / "docs" / "config.md").read_text()
    keys = [row[0] for row in reference_rows()]
    assert {"train.lr.layer3", "augment.negative.noise_std", "evaluate.n_boot"} <= set(keys)
    missing = [key for key in keys if f"| `{key}` |" not in page]
    assert not missing


def test_readme_is_short_and_keeps_the_two_commands():
    text = README.read_text()
    assert len(text.splitlines()) <= README_MAX_LINES
    assert DEMO_COMMAND in text
    assert TEST_COMMAND in text
    assert TEST_COMMAND in (ROOT / ".ci" / "run").read_text()


def test_a_cpu_user_learns_at_the_first_command_what_it_pulls_and_the_cpu_line():
    text = README.read_text()
    first, cpu = text.index(DEMO_COMMAND), text.index(CPU_DEMO_COMMAND)
    assert "CUDA build, about 6 GB" in text[text.index("## Install") : first]
    assert first < cpu < text.index(TEST_COMMAND)
    assert "Without a GPU" in text[first:cpu]


def test_the_augmentation_leak_has_one_figure():
    """The AUC that train's warning quotes is the one the README and the architecture page give
    and the mean of the measured row in docs/benchmarks.md."""
    differs = AugmentConfig(negative=AugmentConfig().negative.model_copy(update={"scale": 0.1}))
    quoted = re.findall(r"random labels[^.]*?AUC (0\.\d+)", class_dependent_warning(differs))
    assert len(quoted) == 1
    for page in (README, ROOT / "docs" / "architecture.md"):
        figures = re.findall(r"random labels[^.]*?AUC (0\.\d+)", page.read_text())
        assert figures and set(figures) == set(quoted), page.name
    measured = re.search(
        r"^\| negatives rotated[^\n]*\| (0\.\d+) \|$",
        (ROOT / "docs" / "benchmarks.md").read_text(),
        re.MULTILINE,
    )
    assert measured and measured.group(1) == quoted[0]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    assert page.is_file()
    assert not _broken_links(page)


def test_the_link_check_finds_a_broken_link(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "there.md").write_text("# A heading, with `code`\n")
    page = tmp_path / "README.md"
    page.write_text(
        "[ok](docs/there.md) [ok](docs/there.md#a-heading-with-code) [web](https://example.org)\n"
        "`[not a link](nowhere.md)`\n\n```\n[not a link](nowhere.md)\n```\n"
        "[gone](docs/missing.md) [bad anchor](docs/there.md#elsewhere)\n[0.3, 1]: a range\n\n"
        "[ref]: docs/gone.md\n"
    )
    assert _broken_links(page) == [
        f"docs/missing.md (no file {tmp_path / 'docs' / 'missing.md'})",
        "docs/there.md#elsewhere (no heading #elsewhere in there.md)",
        f"docs/gone.md (no file {tmp_path / 'docs' / 'gone.md'})",
    ]
