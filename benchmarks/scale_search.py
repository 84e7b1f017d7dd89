"""Top-k search over an ImageNet-sized gradient index: chunked exact, FAISS flat, FAISS IVF.

An index of ``--rows`` (1.28M) rows of ``--dim`` (256) float32 features is written to a temporary
directory (``/tmp``, deleted at the end) and read back, then searched for the top ``--k`` (100)
rows of each of ``--queries`` test vectors, one query at a time (as a click in the explorer
asks), by Grad-Cos (rows divided by their norms):

- the baseline: all scores at once (``score`` of ``index.dots``, then ``topk``), as ``top_k`` did
  before this search;
- the chunked exact search (`tfa_widgets.core.search.exact_top_k`), ``--chunk-mb`` at a time;
- FAISS flat (``IndexFlatIP``): build, save, load, query latency;
- FAISS IVF (``IndexIVFFlat``, ``nlist`` about ``√N``): build (k-means on a seeded sample, then
  adding every row), save, load, query latency and recall of the flat top-k for each ``nprobe``.

The features are random but clustered (one centre per ``--rows-per-cluster`` rows, plus Gaussian
``--noise``), as gradients
cluster by class and by visual pattern; on structureless Gaussian features the nearest rows of a
query lie in no particular cluster and an IVF needs to probe most of them. Medians over the
queries; the machine's load average is printed beside the figures.

On a machine whose cores are busy with other work, each parallel operation waits for its threads
to be scheduled: the chunked search, a dozen element-wise passes per chunk, suffers more from that
than the baseline, which makes the same passes once over all rows; ``--threads 1`` measures
without that wait.

Usage: python benchmarks/scale_search.py [--rows 1280000] [--dim 256] [--quick] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from tfa_widgets.core import faiss_search
from tfa_widgets.core.index import GradientIndex
from tfa_widgets.core.scoring import make_scorer
from tfa_widgets.core.search import SearchSettings, SearchTerm, exact_top_k


def score(method, dots, train_norms, test_norms):
    """The scorer's own score of ``⟨g_i, g_t⟩`` and the norms (the brute-force reference)."""
    return make_scorer(method).index_scores(dots, train_norms, test_norms)


CLOCK = time.perf_counter


def clustered_index(rows: int, dim: int, clusters: int, noise: float, seed: int) -> GradientIndex:
    """Return an index of clustered random features with their norms as the exact norms."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(clusters, dim, generator=generator)
    features = torch.empty(rows, dim)
    for start in range(0, rows, 1 << 16):
        stop = min(rows, start + (1 << 16))
        labels = torch.randint(0, clusters, (stop - start,), generator=generator)
        features[start:stop] = centres[labels] + noise * torch.randn(
            stop - start, dim, generator=generator
        )
    return GradientIndex(
        features=features,
        norms=features.norm(dim=1),
        fingerprint=f"scale-search-{rows}x{dim}-{seed}",
    )


def clustered_queries(index: GradientIndex, count: int, noise: float, seed: int) -> torch.Tensor:
    """Queries near rows of the index (a test image resembles some training images), moved
    off them by the same noise the rows have around their centres."""
    generator = torch.Generator().manual_seed(seed + 1)
    rows = torch.randint(0, len(index), (count,), generator=generator)
    return index.features[rows] + noise * torch.randn(
        count, index.features.shape[1], generator=generator
    )


def median_latency(search, queries: torch.Tensor) -> tuple[float, list[torch.Tensor]]:
    """Return the median seconds per query and each query's found indices."""
    times, found = [], []
    for query in queries:
        start = CLOCK()
        found.append(search(query[None]))
        times.append(CLOCK() - start)
    return statistics.median(times), found


def recall(found: list[torch.Tensor], truth: list[torch.Tensor]) -> float:
    """Return the share of the true top-k rows found, over all queries."""
    hits = sum(
        len(set(a.flatten().tolist()) & set(b.flatten().tolist()))
        for a, b in zip(found, truth, strict=True)
    )
    return hits / sum(t.numel() for t in truth)


def load_average() -> str:
    return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_280_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--rows-per-cluster", type=int, default=640)
    parser.add_argument("--noise", type=float, default=1.0)
    parser.add_argument("--queries", type=int, default=20)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--chunk-mb", type=float, default=256)
    parser.add_argument("--nlist", type=int, default=None)
    parser.add_argument("--nprobe", type=str, default="8,16,32,64")
    parser.add_argument("--quick", action="store_true", help="100,000 rows: a check in seconds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch and FAISS threads (their default: all)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        faiss_search.require_faiss("faiss").omp_set_num_threads(args.threads)
    rows = 100_000 if args.quick else args.rows
    method, k = "grad_cos", args.k
    directory = Path(tempfile.mkdtemp(prefix="tfa-scale-search-"))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `kill` still removes the files
    try:
        run(args, rows, method, k, directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def run(args, rows: int, method: str, k: int, directory: Path) -> None:
    clusters = max(1, rows // args.rows_per_cluster)
    print(
        f"index {rows:,} rows x {args.dim} float32 ({rows * args.dim * 4 / 2**30:.2f} GiB), "
        f"{clusters} clusters (centres N(0, 1), noise N(0, {args.noise}^2) per coordinate); "
        f"top-{k} by {method}, {args.queries} queries one at a time; "
        f"torch {torch.get_num_threads()} threads; {load_average()}"
    )
    start = CLOCK()
    index = clustered_index(rows, args.dim, clusters, args.noise, args.seed)
    queries = clustered_queries(index, args.queries, args.noise, args.seed)
    path = directory / "index.safetensors"
    index.save(path)
    del index
    index = GradientIndex.load(path, f"scale-search-{rows}x{args.dim}-{args.seed}")
    print(f"generated, saved and loaded the index in {CLOCK() - start:.1f} s")

    def terms(query: torch.Tensor) -> list[SearchTerm]:
        return [SearchTerm(index, query, query.norm(dim=1))]

    def whole(query: torch.Tensor) -> torch.Tensor:
        """``top_k`` before chunks: all scores at once (`score` over ``index.dots``), topk."""
        scores = score(
            method, index.dots(query).T, index.norms[None, :], query.norm(dim=1)[:, None]
        )
        return (1.0 * scores).topk(k, dim=1).indices

    chunk_rows = SearchSettings(chunk_mb=args.chunk_mb).rows_per_chunk(args.dim)
    baseline, _ = median_latency(whole, queries)
    chunked, truth = median_latency(
        lambda q: exact_top_k(terms(q), method, k, False, chunk_rows)[0], queries
    )
    print(f"{'query latency, median':<44} {'s/query':>8}  recall of exact top-{k}")
    print(f"{'  all scores at once + topk (before; baseline)':<44} {baseline:8.3f}  1")
    print(f"{f'  chunked exact ({chunk_rows} rows a chunk)':<44} {chunked:8.3f}  1")

    settings = {"faiss": SearchSettings("faiss", chunk_mb=args.chunk_mb)}
    settings["ivf"] = SearchSettings("ivf", chunk_mb=args.chunk_mb, nlist=args.nlist)
    for kind, setting in settings.items():
        all_terms = terms(queries[:1])
        start = CLOCK()
        structure = faiss_search.build(all_terms, method, setting, progress=False)
        built = CLOCK() - start
        file = directory / f"{kind}.faiss"
        start = CLOCK()
        faiss_search.save(structure, file, kind)
        saved = CLOCK() - start
        del structure
        start = CLOCK()
        structure = faiss_search.load(file, kind)
        loaded = CLOCK() - start
        size = file.stat().st_size / 2**30
        extra = f", nlist {structure.nlist}" if kind == "ivf" else ""
        print(
            f"{kind} structure: built in {built:.1f} s, saved in {saved:.1f} s, loaded in "
            f"{loaded:.1f} s, {size:.2f} GiB on disk{extra}; {load_average()}"
        )
        probes = [int(p) for p in args.nprobe.split(",")] if kind == "ivf" else [0]
        for nprobe in probes:
            latency, found = median_latency(
                lambda q, n=nprobe, s=structure: faiss_search.search(
                    s, terms(q), method, k, False, n
                )[0],
                queries,
            )
            label = f"  faiss {kind}" + (f", nprobe {nprobe}" if kind == "ivf" else "")
            print(f"{label:<44} {latency:8.3f}  {recall(found, truth):.3f}")
        del structure
        file.unlink()
    print(load_average())


if __name__ == "__main__":
    main()
