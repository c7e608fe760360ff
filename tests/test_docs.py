"""The documentation's relative links resolve, and the product does not lean on the lab."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md"), *(ROOT / "lab").glob("*.md"),
                *(ROOT / "lab").glob("*/README.md")])
PAGES = [p for p in PAGES if "/runs/" not in p.as_posix()]   # generated reports keep their own paths
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _relative_links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)  # not code blocks
    return [t.split("#")[0] for t in LINK.findall(text)
            if not re.match(r"[a-z]+:", t) and not t.startswith("#")]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_to_existing_files(page):
    missing = [t for t in _relative_links(page) if t and not (page.parent / t).exists()]
    assert not missing, f"{page.relative_to(ROOT)} links to missing {missing}"


def test_src_does_not_refer_to_the_lab():
    """Code explains itself; a lab log's sections are history, not documentation of the code."""
    pattern = re.compile(r"lab/|lab log|long_range\.md, (section|8)|sections? 8[a-i]?\b")
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in (ROOT / "src").rglob("*.py")
            for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
            if pattern.search(line)]
    assert not hits


def test_scripts_holds_only_user_tools():
    """scripts/ keeps what users run (setup and documented tools); research lives in lab/scripts."""
    documented = {p.name for p in (ROOT / "scripts").iterdir()}
    assert documented == {"setup.sh", "gpu_check.sh", "gpu_check_report.py", "bench_hf_generate.py",
                          "context_parallel_table.py"}
    text = "\n".join(p.read_text(encoding="utf-8") for p in PAGES)
    assert all(f"scripts/{name}" in text for name in documented - {"gpu_check_report.py"})


def _bench_commands(page: Path) -> list[str]:
    """The `blockstate bench ...` command lines of a page: in code blocks (continued lines joined,
    comments dropped) and in inline code (wrapped lines joined)."""
    text = page.read_text(encoding="utf-8")
    found = []
    for block in re.findall(r"```[^\n]*\n(.*?)```", text, flags=re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            line = line.split(" #")[0].strip().removeprefix("$ ")
            if line.startswith("blockstate bench "):
                found.append(line)
    for span in re.findall(r"`([^`]+)`", re.sub(r"```.*?```", "", text, flags=re.S)):
        span = " ".join(span.split()).replace("\\|", "|")  # `a\|b` in a table is `a|b`
        if "blockstate bench " in span:
            found.append(span[span.index("blockstate bench "):])
    return found


BENCH_PAGES = sorted({*PAGES, *(p for p in (ROOT / "lab").rglob("*.md") if "/runs/" not in p.as_posix())})


def test_every_documented_bench_command_parses():
    """Each `blockstate bench` command in the README, docs/ and lab/ parses with the real parser
    (`blockstate bench layers|models|...` stands for each suite)."""
    from blockstate.cli import build_parser

    commands = {c for page in BENCH_PAGES for c in _bench_commands(page)}
    assert len(commands) > 20 and any(c.startswith("blockstate bench quality") for c in commands)
    failed = []
    for command in sorted(commands):
        words = command.split()[1:]
        for suite in words[1].split("|"):
            try:
                build_parser().parse_args([words[0], suite, *words[2:]])
            except SystemExit as exit_:  # --help exits with 0
                if exit_.code:
                    failed.append(command)
    assert not failed, f"documented commands that no longer parse: {failed}"
