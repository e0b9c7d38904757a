"""mkdocs hook: the plots in ``benchmarks/results/`` become site files (the tables are
included with snippets), so the benchmark pages show what the scripts last wrote."""

import pathlib

from mkdocs.structure.files import File

ROOT = pathlib.Path(__file__).resolve().parent.parent


def on_files(files, config):
    for png in sorted((ROOT / "benchmarks" / "results").glob("*.png")):
        files.append(File.generated(config, f"results/{png.name}", abs_src_path=str(png)))
    return files


def on_page_markdown(markdown, page, config, files):
    """``benchmark-results.md`` gets every table file under ``benchmarks/results/``."""
    if page.file.src_uri != "benchmark-results.md":
        return markdown
    parts = [markdown]
    for md in sorted((ROOT / "benchmarks" / "results").glob("*.md")):
        body = md.read_text(encoding="utf-8").replace("\n# ", "\n### ")
        body = body[2:] if body.startswith("# ") else body
        parts.append(f"## {md.name}\n\n{body}\n")
    for png in sorted((ROOT / "benchmarks" / "results").glob("*.png")):
        parts.append(f"## {png.name}\n\n![{png.stem}](results/{png.name})\n")
    return "\n".join(parts)
