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
