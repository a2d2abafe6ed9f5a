"""Assemble BENCHMARKS.md from the per-area result files in bench/results/.

Each area's engineer records what they measured (command, machine, numbers)
in bench/results/<area>.md; this keeps one file for readers.
"""
from __future__ import annotations

import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
ORDER = ["ingest", "curation_dedup", "curation_kmeans", "curation_scale", "loader", "train", "labeling", "jobs"]

HEADER = """# Benchmarks

Every benchmark runs us and the peer side by side in one run and prints the
ratio. Machine unless stated: the project's 2-core x86-64 CPU VM, 24 GiB, no
GPU, Python 3.11.7. Each figure states the load it was taken under: the
2026-12-02 runs were taken one at a time on an otherwise idle machine, older
ones often shared the two cores (CPU time per item is given where that
distorted the wall clock). Re-run any of them with the command shown.

| area | script | target | result |
|---|---|---|---|
"""


def main() -> None:
    results = ROOT / "bench" / "results"
    names = sorted(p.stem for p in results.glob("*.md"))
    ordered = [n for n in ORDER if n in names] + [n for n in names if n not in ORDER]
    summary = (results / "_summary.md").read_text() if (results / "_summary.md").exists() else ""
    parts = [HEADER + summary.strip() + "\n"]
    for name in ordered:
        if name.startswith("_"):
            continue
        text = (results / f"{name}.md").read_text().strip()
        if text.startswith("# "):  # each area's title becomes a section
            text = "#" + text
        parts.append("\n---\n\n" + text + "\n")
    (ROOT / "BENCHMARKS.md").write_text("".join(parts))
    print(f"wrote {ROOT / 'BENCHMARKS.md'} from {len(ordered)} result file(s)")


if __name__ == "__main__":
    main()
