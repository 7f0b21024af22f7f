"""Index time and peak resident memory of ``ManifestDataModule`` on large synthetic manifests.

    python -m benchmarks.manifest_index                       # 1e5 and 1e6 rows, CSV and Parquet
    python -m benchmarks.manifest_index --rows 100000 --formats csv --setup

Each measurement runs in a fresh Python process (so peak RSS is that run's alone). The manifest
points at a few real tiny PNGs written next to it; one row in ten has no image and another one in
ten no text (naturally missing), labels cycle over 50 class names, and a validation split is carved from
train (stratified). Measured:

- ``index_s`` (wall) and ``index_cpu_s`` (this process's CPU time: on a busy shared machine the
  wall time includes waiting for a core): construction (read the file with pyarrow, parse every
  column, infer the classes, carve validation) plus the sample records of train and val, i.e. what
  the manifest adds;
- ``setup_s`` (with ``--setup``): the base DataModule's ``setup("fit")`` on top (index-time checks,
  missing tables, tokenisation of every text with the tiny-bert / MiniLM tokenizer);
- ``peak_rss_mib``: the process's peak resident set (``ru_maxrss``), ``baseline_rss_mib`` its
  resident set after the imports (torch and Lightning alone take about 1 GiB), before anything is
  read, and ``index_rss_increase_mib``: peak during indexing minus that baseline.

Writes ``<out>/manifest_index.json`` and ``manifest_index.md`` (with the command line).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

N_CLASSES = 50
N_IMAGES = 4


def write_manifest(folder: Path, rows: int, fmt: str) -> Path:
    """A synthetic manifest of ``rows`` rows (vectorised: numpy + pyarrow, no per-row Python)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq
    from PIL import Image

    (folder / "img").mkdir(parents=True, exist_ok=True)
    for i in range(N_IMAGES):
        Image.new("RGB", (16, 16), (60 * i, 30, 200 - 40 * i)).save(folder / "img" / f"{i}.png")
    index = np.arange(rows)
    ids = pa.array(np.char.add("item", index.astype(str)))
    paths = pa.array(np.char.add(np.char.add("img/", (index % N_IMAGES).astype(str)), ".png"))
    paths = pc.if_else(pa.array(index % 10 == 9), pa.scalar("", pa.string()), paths)
    words = pa.array(np.char.add("a synthetic product number ", index.astype(str)))
    texts = pc.if_else(pa.array(index % 10 == 4), pa.scalar("", pa.string()), words)
    labels = pa.array(np.char.add("class", (index % N_CLASSES).astype(str)))
    table = pa.table({"id": ids, "image": paths, "text": texts, "label": labels})
    path = folder / f"manifest_{rows}.{fmt}"
    if fmt == "csv":
        pacsv.write_csv(table, path)
    else:
        pq.write_table(table, path)
    return path


def rss_mib() -> float:
    """Peak resident set of this process so far, in MiB (Linux reports ``ru_maxrss`` in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mib() -> float:
    """Resident set of this process now, in MiB (``VmRSS``; Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(path: str, setup: bool) -> dict:
    """One measurement (run in its own process)."""
    from datamodules.manifest import ManifestDataModule

    baseline = current_rss_mib()
    start, cpu = time.perf_counter(), time.process_time()
    dm = ManifestDataModule(
        train_file=path,
        id_column="id",
        image_encoder="test_vit",
        text_encoder="tiny-bert",
        image_size=32,
        max_text_len=32,
        missing_table_dir=str(Path(path).parent / "tables"),
    )
    records = {split: dm._read_split(split)[0] for split in ("train", "val")}
    index_s, index_cpu_s = time.perf_counter() - start, time.process_time() - cpu
    out = {
        "rows": sum(len(r) for r in records.values()),
        "train": len(records["train"]),
        "val": len(records["val"]),
        "classes": dm.num_classes,
        "index_s": round(index_s, 2),
        "index_cpu_s": round(index_cpu_s, 2),
        "baseline_rss_mib": round(baseline, 1),
        "index_peak_rss_mib": round(rss_mib(), 1),
        "index_rss_increase_mib": round(rss_mib() - baseline, 1),
    }
    if setup:
        del records
        dm = ManifestDataModule(**{k: v for k, v in dm.hparams.items() if not k.startswith("_")})
        start, cpu = time.perf_counter(), time.process_time()
        dm.setup("fit")
        out["setup_s"] = round(time.perf_counter() - start, 2)
        out["setup_cpu_s"] = round(time.process_time() - cpu, 2)
        out["natural_missing"] = dm.natural_missing_counts
    out["peak_rss_mib"] = round(rss_mib(), 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument(
        "--formats", nargs="+", default=["csv", "parquet"], choices=["csv", "jsonl", "parquet"]
    )
    parser.add_argument(
        "--setup", action="store_true", help="also time the base setup (checks, tokenisation)"
    )
    parser.add_argument("--work", default="runs/manifest_index", help="where the synthetic manifests go")
    parser.add_argument("--out", default="runs/manifest_index", help="where the results go")
    parser.add_argument("--child", nargs=2, metavar=("PATH", "SETUP"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1] == "1")))
        return
    work, out = Path(args.work), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for rows in args.rows:
        for fmt in args.formats:
            folder = work / f"{fmt}_{rows}"
            path = folder / f"manifest_{rows}.{fmt}"
            if not path.exists():
                write_manifest(folder, rows, fmt)
            command = [
                sys.executable,
                "-m",
                "benchmarks.manifest_index",
                "--child",
                str(path),
                "1" if args.setup else "0",
            ]
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            result = {
                "format": fmt,
                "file_mib": round(path.stat().st_size / 2**20, 1),
                **json.loads(done.stdout.strip().splitlines()[-1]),
            }
            print(json.dumps(result), file=sys.stderr)
            results.append(result)
    meta = {
        "command": "python -m benchmarks.manifest_index " + " ".join(sys.argv[1:]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load average "
        f"{', '.join(f'{x:.1f}' for x in os.getloadavg())} at the end",
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
    }
    (out / "manifest_index.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    lines = [
        "# ManifestDataModule indexing: time and peak memory",
        "",
        f"Command: `{meta['command']}` ({meta['date']}, {meta['machine']}, Python {meta['python']}).",
        "",
        "| rows | format | file MiB | index s (CPU s) | peak RSS MiB | baseline RSS MiB "
        "| index increase MiB |" + (" setup s (CPU s) | peak RSS MiB after setup |" if args.setup else ""),
        "|---:|---|---:|---:|---:|---:|---:|" + ("---:|---:|" if args.setup else ""),
    ]
    for r in results:
        line = (
            f"| {r['rows']:,} | {r['format']} | {r['file_mib']} | {r['index_s']} ({r['index_cpu_s']}) | "
            f"{r['index_peak_rss_mib']} | {r['baseline_rss_mib']} | {r['index_rss_increase_mib']} |"
        )
        if args.setup:
            line += f" {r['setup_s']} ({r['setup_cpu_s']}) | {r['peak_rss_mib']} |"
        lines.append(line)
    (out / "manifest_index.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
