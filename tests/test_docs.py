"""The README and docs/: their links lead somewhere, and the benchmark table lists what is there."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def anchors(markdown: str) -> set[str]:
    """GitHub's anchors for a page's headings: lower case, punctuation dropped, spaces to hyphens."""
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#+ (.+)$", markdown, flags=re.M)}


@pytest.mark.parametrize("page", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_lead_to_files_and_headings_that_exist(page):
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        assert dest.exists(), f"{page.name} links to {target}, which does not exist"
        if anchor:
            assert anchor in anchors(dest.read_text()), f"{page.name} links to {target}: no such heading"


def test_the_readme_benchmark_table_lists_every_benchmark_script():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Benchmarks", 1)[1]
    listed = set(re.findall(r"^\| `([\w.]+)` \|", section, flags=re.M))
    present = {p.name for p in (ROOT / "benchmarks").iterdir()
               if p.suffix in (".py", ".sh") and p.name != "bench_common.py"}
    assert listed == present


def test_anchors_follow_github_rules():
    assert anchors("# Speed and measurements\n## `--cuda-graph`\n### cifarlab's CPU kernels\n") == {
        "speed-and-measurements", "--cuda-graph", "cifarlabs-cpu-kernels"}


def test_the_python_the_readme_names_is_the_one_the_package_requires():
    import tomllib

    required = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    low = re.fullmatch(r">=(\d+)\.(\d+)", required)
    assert low, f"requires-python {required!r}: expected '>=X.Y'"
    assert f"Python {low[1]}.{low[2]}+" in (ROOT / "README.md").read_text()


def test_the_documented_about_file_is_one_cifarlab_reads(tmp_path):
    from cifarlab.about import read_about

    section = (ROOT / "docs" / "reports.md").read_text().split("## What only the owner knows", 1)[1]
    example = re.search(r"```yaml\n(.*?)```", section, flags=re.S).group(1)
    (tmp_path / "about.yaml").write_text(example)
    facts = read_about(tmp_path / "about.yaml")
    assert facts["model"]["developers"] and facts["data"]["consent"]
