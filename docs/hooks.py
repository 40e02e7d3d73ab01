"""MkDocs hook: the committed benchmark plots (``results/**/*.png``) are part of the site, so pages embed them as
``results/<card>/<run>/<plot>.png`` from the one copy the benchmarks wrote, not from a copy under ``docs/``."""

from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parent.parent


def on_files(files, config):
    for plot in sorted((ROOT / "results").rglob("*.png")):
        files.append(File(str(plot.relative_to(ROOT)), src_dir=str(ROOT), dest_dir=config["site_dir"],
                          use_directory_urls=config["use_directory_urls"]))
    return files
