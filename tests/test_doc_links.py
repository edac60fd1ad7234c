"""Every relative link and image in README.md, CHANGELOG.md and docs/ points to a file that exists, and
every #anchor into a Markdown file names one of its headings (as GitHub renders them)."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.S | re.M)
CODE_SPAN = re.compile(r"`[^`\n]*`")
INLINE = re.compile(r"!?\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^ {0,3}\[[^\]\n]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$", re.M)


def doc_files(root=ROOT):
    files = [root / "README.md", root / "CHANGELOG.md", *sorted((root / "docs").rglob("*.md"))]
    return [f for f in files if f.exists()]


def _prose(text):
    """The text outside fenced and indented code blocks, with code spans blanked (links stay whole)."""
    text = FENCE.sub("", text)
    text = "\n".join(line for line in text.splitlines() if not re.match(r"^(    |\t)", line))
    return CODE_SPAN.sub("`x`", text)


def slug(heading):
    """GitHub's anchor for a heading: lower case, code marks and punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def anchors(path):
    text = FENCE.sub("", path.read_text(encoding="utf8"))
    seen, out = {}, set()
    for h in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.M):
        s = slug(h)
        n = seen.get(s, 0)
        seen[s] = n + 1
        out.add(s if n == 0 else f"{s}-{n}")
    return out


def broken_links(path):
    """(target, why) for each relative link of one Markdown file that does not resolve."""
    prose = _prose(path.read_text(encoding="utf8"))
    bad = []
    for target in INLINE.findall(prose) + REFERENCE.findall(prose):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
            continue
        file_part, _, fragment = target.partition("#")
        dest = path if not file_part else (path.parent / file_part).resolve()
        if not dest.exists():
            bad.append((target, "no such file"))
        elif fragment and dest.suffix == ".md" and fragment.lower() not in anchors(dest):
            bad.append((target, "no such heading"))
    return bad


def test_every_relative_link_in_the_docs_resolves():
    files = doc_files()
    assert {f.name for f in files} >= {"README.md", "CHANGELOG.md"}
    assert any(f.parent.name == "studies" for f in files)
    problems = {str(f.relative_to(ROOT)): broken_links(f) for f in files}
    assert {k: v for k, v in problems.items() if v} == {}


def test_the_checker_finds_a_missing_file_a_missing_heading_and_skips_code(tmp_path):
    (tmp_path / "docs" / "figures").mkdir(parents=True)
    (tmp_path / "docs" / "figures" / "a.png").write_bytes(b"\x89PNG")
    (tmp_path / "docs" / "b.md").write_text("# Title\n\n## The `run` command\n")
    (tmp_path / "README.md").write_text(
        "![ok](docs/figures/a.png) ![gone](docs/figures/missing.png) [ok](docs/b.md#the-run-command)\n"
        "[bad anchor](docs/b.md#nowhere) [web](https://example.org/x) [self](#top) [ref][r]\n\n# Top\n\n"
        "```\n[in code](not/there.md)\n```\n\n    [indented](not/there.md)\n\n[r]: docs/gone.md\n")
    assert broken_links(tmp_path / "README.md") == [
        ("docs/figures/missing.png", "no such file"), ("docs/b.md#nowhere", "no such heading"),
        ("docs/gone.md", "no such file")]
    assert doc_files(tmp_path) == [tmp_path / "README.md", tmp_path / "docs" / "b.md"]
