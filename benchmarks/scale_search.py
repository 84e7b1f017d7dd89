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

The features stand in for projected gradient features (``--features gradient``, the default):
each row is ``σ ⊙ (z_c + τ u_i) + ν ε_i``, a class centre ``z_c`` (``--classes`` 1,000, as
ImageNet) and the example's own variation ``u_i`` (``--tau`` 1: as wide as the classes are
apart, so classes overlap) along the same decaying spectrum ``σ_j = j^-α`` (``--alpha`` 0.75: a
few directions hold most of the energy), plus isotropic noise ``ε_i`` holding ``--noise-share``
(0.2) of the energy; ``z``, ``u``, ``ε`` standard normal. Its parameters were matched to the
demo model's own index (3,000 rows of d = 4,096, CountSketch; rows divided by their norms): the
top 1 / 8 / 64 principal directions hold 0.27 / 0.64 / 0.79 of its energy, a row's nearest
other row has cosine 0.78 and its 100th nearest 0.61 (medians), random pairs about 0; the run
prints the same figures for 3,000 generated rows of 6 classes (the demo's) and for the
generated index. A query is a new example of a random class (a test image is another draw of
its class, not a copy of a training row). ``--features clustered`` keeps the earlier
generator: one centre per ``--rows-per-cluster`` rows plus Gaussian ``--noise``.
Medians over the queries; the machine's load average is printed beside the figures.

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
    return as_index(features, seed)


def clustered_queries(index: GradientIndex, count: int, noise: float, seed: int) -> torch.Tensor:
    """Queries near rows of the index, moved off them by the noise the rows have around their
    centres."""
    generator = torch.Generator().manual_seed(seed + 1)
    rows = torch.randint(0, len(index), (count,), generator=generator)
    return index.features[rows] + noise * torch.randn(
        count, index.features.shape[1], generator=generator
    )


class GradientLike:
    """Rows ``σ ⊙ (z_c + τ u) + ν ε`` (see the module's docstring), drawn a block at a time."""

    def __init__(self, dim: int, classes: int, alpha: float, tau: float, noise_share: float,
                 seed: int) -> None:  # fmt: skip
        self.generator = torch.Generator().manual_seed(seed)
        self.sigma = torch.arange(1, dim + 1, dtype=torch.float32).pow(-alpha)
        signal = (1 + tau**2) * self.sigma.pow(2).sum()
        self.nu = float((noise_share / (1 - noise_share) * signal / dim).sqrt())
        self.centres = torch.randn(classes, dim, generator=self.generator)
        self.tau = tau

    def draw(self, count: int) -> torch.Tensor:
        """Return ``count`` new rows of random classes."""
        g, (classes, dim) = self.generator, self.centres.shape
        labels = torch.randint(0, classes, (count,), generator=g)
        own = self.centres[labels] + self.tau * torch.randn(count, dim, generator=g)
        return self.sigma * own + self.nu * torch.randn(count, dim, generator=g)


def gradient_like_index(rows: int, source: GradientLike, seed: int) -> GradientIndex:
    """Return an index of ``rows`` rows drawn from ``source``."""
    features = torch.empty(rows, source.centres.shape[1])
    for start in range(0, rows, 1 << 16):
        stop = min(rows, start + (1 << 16))
        features[start:stop] = source.draw(stop - start)
    return as_index(features, seed)


def as_index(features: torch.Tensor, seed: int) -> GradientIndex:
    """Return the features as an index, their norms as the exact norms."""
    rows, dim = features.shape
    return GradientIndex(
        features=features,
        norms=features.norm(dim=1),
        fingerprint=f"scale-search-{rows}x{dim}-{seed}",
    )


def structure_figures(features: torch.Tensor) -> str:
    """Return the share of energy of the top 1 / 8 / 64 principal directions and the median
    cosine of a row's nearest and 100th nearest other row, of the first 3,000 rows divided
    by their norms (the figures the generator was matched on)."""
    rows = features[:3000].double()
    rows = rows / rows.norm(dim=1, keepdim=True)
    energy = torch.linalg.svdvals(rows).pow(2).cumsum(0)
    shares = [energy[min(r, len(energy)) - 1] / energy[-1] for r in (1, 8, 64)]
    cosines = rows @ rows.T
    cosines.fill_diagonal_(-2)
    nearest = cosines.topk(min(100, len(rows) - 1), dim=1).values.median(dim=0).values
    return (
        "energy of the top 1/8/64 directions " + " / ".join(f"{s:.2f}" for s in shares)
        + f", nearest-row cosine {nearest[0]:.2f}, 100th {nearest[-1]:.2f}"
    )  # fmt: skip


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
    parser.add_argument("--features", choices=("gradient", "clustered"), default="gradient")
    parser.add_argument("--classes", type=int, default=1000, help="gradient: classes")
    parser.add_argument("--alpha", type=float, default=0.75, help="gradient: spectrum decay")
    parser.add_argument("--tau", type=float, default=1.0, help="gradient: within-class spread")
    parser.add_argument("--noise-share", type=float, default=0.2, help="gradient: noise energy")
    parser.add_argument("--rows-per-cluster", type=int, default=640, help="clustered")
    parser.add_argument("--noise", type=float, default=1.0, help="clustered: noise σ")
    parser.add_argument("--queries", type=int, default=20)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--chunk-mb", type=float, default=256)
    parser.add_argument("--nlist", type=int, default=None)
    parser.add_argument("--nprobe", type=str, default="8,16,32,64,128")
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
    start = CLOCK()
    if args.features == "gradient":
        source = GradientLike(
            args.dim, args.classes, args.alpha, args.tau, args.noise_share, args.seed
        )
        demo_like = GradientLike(args.dim, 6, args.alpha, args.tau, args.noise_share, args.seed)
        what = (
            f"gradient-like features ({args.classes} classes, alpha {args.alpha}, tau "
            f"{args.tau}, noise share {args.noise_share})"
        )
        demo_figures = structure_figures(demo_like.draw(3000))
        print(f"3,000 generated rows of 6 classes (the demo's): {demo_figures}")
        index = gradient_like_index(rows, source, args.seed)
        queries = source.draw(args.queries)
    else:
        clusters = max(1, rows // args.rows_per_cluster)
        what = f"{clusters} clusters (centres N(0, 1), noise N(0, {args.noise}^2) per coordinate)"
        index = clustered_index(rows, args.dim, clusters, args.noise, args.seed)
        queries = clustered_queries(index, args.queries, args.noise, args.seed)
    print(
        f"index {rows:,} rows x {args.dim} float32 ({rows * args.dim * 4 / 2**30:.2f} GiB), "
        f"{what}; top-{k} by {method}, {args.queries} queries one at a time; "
        f"torch {torch.get_num_threads()} threads; {load_average()}"
    )
    print(f"the index's first 3,000 rows: {structure_figures(index.features)}")
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
