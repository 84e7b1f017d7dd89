"""Agreement and speed of our scorers against the field's implementations, timed in one run.

    make bench-peers                                              # makes .venv-peers, runs this
    .venv-peers/bin/python benchmarks/bench_peers.py --test-images 20
    .venv-peers/bin/python benchmarks/bench_peers.py --train 500 --test-images 4   # smoke run
    .venv-peers/bin/python benchmarks/bench_peers.py --peers --quanda \
        --quanda-peers CaptumTracInCPFast Kronfluence TRAK      # quanda's table alone

On the demo model (``--demo-seed``, 0 by default), for the same test images and the same
explained class (the model's prediction):

- ours grad-cos (exact index, and projected index) against dattri's `TracInAttributor` with
  normalised gradients and no projection (gradient cosine, one checkpoint of weight 1);
- ours grad-dot against Captum's `TracInCP` (one checkpoint, learning rate 1: the plain dot);
- ours TracIn-CP against Captum's `TracInCP` over the demo's training checkpoints, each at its
  recorded learning rate (`tfa_widgets.data.demo_checkpoints`);
- ours grad-dot over the last layer's weight (``params="fc.weight"``) against Captum's
  `TracInCPFast` (the same quantity by its factorisation) and `TracInCPFastRandProj`
  (the same through a random projection).

Agreement is the Spearman correlation of all N training scores per test image and the overlap of
the top-k sets, mean and minimum over test images. Times: index build (ours) or set-up (peers),
and per-query time (all test images scored, divided by their number). Absolute times on a shared
CPU mean little; the ratios against ours, measured in the same run, are the figures to read.
With ``--quanda``, quanda's metric classes score our scorers (through `TFAExplainer`), quanda's
own wrappers of the peers named by ``--quanda-peers`` (`quanda_peers.py`) and a random
attributor, on the first ``--quanda-train`` training images (all by default).
The peers are not in the default install: `make bench-peers` builds a separate environment.
"""

from __future__ import annotations

import argparse
import copy
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

sys.path.insert(0, str(Path(__file__).parent))  # quanda_peers.py, beside this script

from tfa_widgets.core.engine import TFAEngine
from tfa_widgets.data import load_demo
from tfa_widgets.eval.sanity import spearman
from tfa_widgets.eval.setups import draw


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Return the command-line settings."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--test-images", type=int, default=20, help="test images compared")
    parser.add_argument("--train", type=int, default=None, help="first N training images only")
    parser.add_argument("--k", type=int, default=8, help="top-k for the overlap")
    parser.add_argument("--seed", type=int, default=0, help="draws the test images")
    parser.add_argument(
        "--demo-seed", type=int, default=0, help="seed of the demo's data and training"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads for everyone (1: the CPU is shared; printed in the header)",
    )
    parser.add_argument(
        "--quanda", action="store_true", help="also quanda's metrics through TFAExplainer"
    )
    parser.add_argument(
        "--quanda-peers",
        nargs="*",
        default=["CaptumTracInCPFast"],
        help="quanda's wrappers of peers in its table (benchmarks/quanda_peers.py)",
    )
    parser.add_argument(
        "--quanda-train",
        type=int,
        default=None,
        help="first N training images only in quanda's table (every attributor)",
    )
    parser.add_argument(
        "--peers",
        nargs="*",
        default=["dattri", "captum", "captum_cp", "captum_fast", "captum_randproj"],
        help="which peers to run (none: only ours, e.g. beside --quanda)",
    )
    return parser.parse_args(argv)


BATCH = 64  # every peer's batch size


def agreement(ours: torch.Tensor, theirs: torch.Tensor, k: int) -> dict[str, float]:
    """Return mean/min Spearman and top-k overlap of two score matrices ``[T, N]``."""
    rhos = [spearman(a, b) for a, b in zip(ours, theirs, strict=True)]
    overlaps = [
        len(set(a.topk(k).indices.tolist()) & set(b.topk(k).indices.tolist())) / k
        for a, b in zip(ours, theirs, strict=True)
    ]
    return {
        "rho_mean": sum(rhos) / len(rhos),
        "rho_min": min(rhos),
        "overlap_mean": sum(overlaps) / len(overlaps),
        "overlap_min": min(overlaps),
    }


def ours(model, train_set, test_set, tests, targets, **engine_kwargs) -> tuple:
    """Return ``(scores [T, N], build seconds, query seconds)`` of our engine."""
    method = engine_kwargs.pop("method")
    engine = TFAEngine(model, train_set, test_set, progress=False, method=method, **engine_kwargs)
    start = time.perf_counter()
    engine.build_index()
    built = time.perf_counter()
    scores = torch.stack([engine.scores(t, target=c) for t, c in zip(tests, targets, strict=True)])
    return scores, built - start, (time.perf_counter() - built) / len(tests)


def dattri_cosine(model, train_set, test_batch) -> tuple:
    """Return ``(scores [T, N], 0, query seconds)`` of dattri's unprojected gradient cosine."""
    from dattri.algorithm.tracin import TracInAttributor
    from dattri.task import AttributionTask

    def loss(params, data):
        image, label = data
        logits = torch.func.functional_call(model, params, image.unsqueeze(0))
        return nn.functional.cross_entropy(logits, label.unsqueeze(0))

    task = AttributionTask(loss_func=loss, model=model, checkpoints=model.state_dict())
    attributor = TracInAttributor(task, weight_list=torch.ones(1), normalized_grad=True)
    attributor.projector_kwargs = None  # exact gradients: its default projects to 512
    start = time.perf_counter()
    scores = attributor.attribute(
        DataLoader(train_set, batch_size=64), DataLoader(TensorDataset(*test_batch), batch_size=64)
    )
    return scores.T, 0.0, (time.perf_counter() - start) / len(test_batch[0])


def captum(kind: str, model, train_set, test_batch, checkpoints: dict, dim: int) -> tuple:
    """Return ``(scores [T, N], set-up seconds, query seconds)`` of a Captum TracIn variant.

    ``checkpoints`` maps checkpoint files to their learning rates (one file at rate 1 is
    grad-dot).
    """
    from captum.influence import TracInCP, TracInCPFast, TracInCPFastRandProj

    def load(net, path):
        net.load_state_dict(torch.load(path))
        return checkpoints[path]  # the learning rate Captum weights this checkpoint by

    common = {"checkpoints": list(checkpoints), "checkpoints_load_func": load, "batch_size": 64}
    start = time.perf_counter()
    if kind in ("captum", "captum_cp"):
        tracin = TracInCP(
            model, train_set, loss_fn=nn.CrossEntropyLoss(reduction="none"),
            sample_wise_grads_per_batch=False, **common,
        )  # fmt: skip
    elif kind == "captum_fast":
        tracin = TracInCPFast(
            model, model.fc, train_set, loss_fn=nn.CrossEntropyLoss(reduction="sum"), **common
        )
    else:
        tracin = TracInCPFastRandProj(
            model, model.fc, train_set, loss_fn=nn.CrossEntropyLoss(reduction="sum"),
            projection_dim=dim, seed=0, **common,
        )  # fmt: skip
    ready = time.perf_counter()
    options = {} if kind == "captum_randproj" else {"show_progress": True}  # on stderr
    scores = tracin.influence(test_batch, k=None, **options)
    return scores, ready - start, (time.perf_counter() - ready) / len(test_batch[0])


def quanda_table(
    demo, tests: list[int], k: int, seed: int, peers: list[str], n_train: int | None = None
) -> tuple[list, list, list]:
    """Return quanda's measures ``(measure, attributor, quanda's value, ours)``, the times
    ``(attributor, fit s, explain s, self-influence s)`` and the failures ``(attributor, stage,
    error)``.

    quanda's metric classes are fed through `TFAExplainer` (our index-backed scorers), quanda's
    own wrappers of the peers named in ``peers`` (`quanda_peers.BUILDERS`) and its
    `RandomExplainer`; "ours" is `tfa_widgets.eval.attribution` on the same explanations.
    ``n_train`` keeps the first N training images (the shortcut and flipped-label images among
    them) for every attributor. Fit is the wrapper's constructor (for ours, the index build or
    its load from the demo's cache); explain is one call on all test images, one batch.
    """
    from quanda.explainers import RandomExplainer
    from quanda.metrics.downstream_eval import (
        ClassDetectionMetric,
        MislabelingDetectionMetric,
        ShortcutDetectionMetric,
    )
    from quanda.metrics.heuristics import TopKCardinalityMetric
    from quanda_peers import BUILDERS, Setting
    from quanda_peers import self_influence as quanda_peers_self_influence

    from tfa_widgets.eval import attribution as ours
    from tfa_widgets.eval.quanda_bridge import TFAExplainer
    from tfa_widgets.eval.tda import fooled_tests

    model, meta = demo.model, demo.metadata
    n = len(demo.train_set) if n_train is None else n_train
    train = demo.train_set if n_train is None else Subset(demo.train_set, range(n))
    labels = torch.as_tensor(demo.train_set.labels[:n])
    shortcut = [i for i in sorted(meta.train_patch_boxes) if i < n]
    flipped = [i for i in sorted(meta.flipped_labels) if i < n]
    images = torch.stack([demo.test_set[t][0] for t in tests])
    with torch.no_grad():
        targets = model(images).argmax(1)
    engine = demo.engine(progress=False)
    fooled = fooled_tests(demo, engine)
    fooled_images = torch.stack([demo.test_set[t][0] for t in fooled])
    fooled_labels = torch.stack([torch.as_tensor(demo.test_set[t][1]) for t in fooled])
    cache = engine.cache_dir if n_train is None else None
    folder = Path(tempfile.mkdtemp(prefix="quanda-peers-"))
    checkpoint = str(folder / "final.pt")
    torch.save(model.state_dict(), checkpoint)

    def tfa(method: str, **kwargs):
        explainer = TFAExplainer(model, train, method=method, cache_dir=cache, **kwargs)
        explainer.engine.build_index()
        return explainer

    makers = {
        "grad_cos": lambda: tfa("grad_cos"),
        "grad_dot": lambda: tfa("grad_dot"),
        "tracin_cp": lambda: tfa("tracin_cp", tracin_checkpoints=demo.checkpoints),
    }
    for name in peers:  # each on its own copy: some wrappers load checkpoints into the model
        setting = Setting(copy.deepcopy(model), train, checkpoint, folder, seed)
        makers[f"quanda {name}"] = lambda build=BUILDERS[name], s=setting: build(s)
    makers["random"] = lambda: RandomExplainer(model, train, seed=seed)
    rows, times, failures = [], [], []
    for name, make in makers.items():
        print(f"quanda table: {name} ...", file=sys.stderr, flush=True)
        nan = float("nan")
        fit = explain = self_seconds = nan
        stage = "fit"
        try:  # a wrapper that fails here gets its error printed instead of its rows
            start = time.perf_counter()
            explainer = make()
            fit = time.perf_counter() - start
            stage = "explain"
            start = time.perf_counter()
            explanations = explainer.explain(images, targets).cpu()
            explain = time.perf_counter() - start
            metric = TopKCardinalityMetric(model, train, top_k=k)
            metric.update(explanations)
            rows.append((f"top-{k} cardinality", name, metric.compute()["score"],
                         ours.top_k_cardinality(explanations, k)))  # fmt: skip
            metric = ClassDetectionMetric(model, train, s=5)
            metric.update(explanations, targets)
            mine = ours.identical_class(explanations, labels, targets.tolist(), s=5)
            rows.append(
                ("identical class@5", name, metric.compute()["score"], sum(mine) / len(mine))
            )
            stage = "explain the fooled test images"
            shortcut_scores = explainer.explain(fooled_images, [meta.shortcut_class] * len(fooled))
            metric = ShortcutDetectionMetric(model, train, shortcut, meta.shortcut_class)
            metric.update(shortcut_scores.cpu(), fooled_images, fooled_labels)
            mine = ours.shortcut_detection(shortcut_scores.cpu(), shortcut)
            rows.append(("shortcut AP", name, metric.compute()["score"], sum(mine) / len(mine)))
            if name != "grad_cos":  # its self-scores are all 1
                stage = "self-influence"
                start = time.perf_counter()
                own = name.removeprefix("quanda ")
                if own in BUILDERS:
                    influence = quanda_peers_self_influence(own, explainer).cpu()
                else:
                    influence = explainer.self_influence(batch_size=BATCH).cpu()
                self_seconds = time.perf_counter() - start
                metric = MislabelingDetectionMetric(
                    model, train, flipped, precomputed_self_influence=influence
                )
                mine = ours.mislabelling_detection(influence, flipped)
                rows.append(("mislabelling AUC", name, metric.compute()["score"], mine))
        except Exception as error:  # noqa: BLE001 - the peers' own errors, reported as they are
            failures.append((name, stage, f"{type(error).__name__}: {error}"))
        times.append((name, fit, explain, self_seconds))
    shutil.rmtree(folder)  # the checkpoint and the peers' caches (traker's features, ...)
    return rows, times, failures


def print_quanda_table(demo, tests: list[int], args: argparse.Namespace) -> None:
    """Print quanda's measures and the attributors' times (`quanda_table`)."""
    rows, times, failures = quanda_table(
        demo, tests, args.k, args.seed, args.quanda_peers, args.quanda_train
    )
    size = "full training set" if args.quanda_train is None else f"first {args.quanda_train}"
    print()
    print(f"quanda's metrics on the demo ({size}, {tests}):")
    print(f"{'measure':22} {'attributor':30} {'quanda':>9} {'ours':>9}")
    for measure, name, theirs, mine in rows:
        print(f"{measure:22} {name:30} {theirs:9.4f} {mine:9.4f}")
    print()
    print(f"times of the attributors above ({len(tests)} test images explained in one call):")
    print(
        f"{'attributor':30} {'fit s':>9} {'explain s':>10} {'per query s':>12} {'self-inf s':>11}"
    )
    for name, fit, explain, self_seconds in times:
        print(
            f"{name:30} {fit:9.2f} {explain:10.2f} {explain / len(tests):12.4f} "
            f"{self_seconds:11.2f}"
        )
    for name, stage, error in failures:
        print(f"{name} failed at {stage}: {error}")


def print_header(args: argparse.Namespace, n: int, tests: list[int]) -> None:
    """Print the command line and the run's settings."""
    command = " ".join(["python benchmarks/bench_peers.py", *map(shlex.quote, sys.argv[1:])])
    print(f"command: {command}")
    print(
        f"demo seed {args.demo_seed}: {n} training images, {len(tests)} test images {tests}, "
        f"top-{args.k}; torch {torch.__version__}, {torch.get_num_threads()} threads"
    )


def main(argv: list[str] | None = None) -> int:
    """Run every comparison and print one table."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    demo = load_demo(args.demo_seed, progress=False)
    model = copy.deepcopy(demo.model)  # Captum loads its checkpoints into the model it is given
    train_set = demo.train_set
    if args.train is not None:
        train_set = Subset(train_set, range(args.train))
    tests = draw(range(len(demo.test_set)), args.test_images, args.seed)
    if not args.peers:  # quanda's table alone
        print_header(args, len(train_set), tests)
        if args.quanda:
            print_quanda_table(demo, tests, args)
        return 0
    images = torch.stack([demo.test_set[t][0] for t in tests])
    with torch.no_grad():
        targets = model(images).argmax(1)
    test_batch = (images, targets)
    n = len(train_set)
    exact_mb = n * sum(p.numel() for p in model.parameters()) * 4 / 2**20 + 1
    runs: dict[str, tuple] = {}
    comparisons: list[tuple[str, str, str]] = []
    targets_list = targets.tolist()
    base = {"model": model, "train_set": train_set, "test_set": demo.test_set}
    runs["ours grad-cos exact"] = ours(
        **base, tests=tests, targets=targets_list, method="grad_cos", memory_budget_mb=exact_mb
    )
    runs["ours grad-cos projected"] = ours(
        **base, tests=tests, targets=targets_list, method="grad_cos", memory_budget_mb=0
    )
    runs["ours grad-dot exact"] = ours(
        **base, tests=tests, targets=targets_list, method="grad_dot", memory_budget_mb=exact_mb
    )
    if "captum_cp" in args.peers:
        runs["ours TracIn-CP exact"] = ours(
            **base, tests=tests, targets=targets_list, method="tracin_cp",
            memory_budget_mb=exact_mb, checkpoints=demo.checkpoints,
        )  # fmt: skip
    runs["ours grad-dot fc.weight"] = ours(
        **base, tests=tests, targets=targets_list, method="grad_dot", params="fc.weight"
    )
    fc_dim = model.fc.weight.numel()
    runs["ours grad-dot fc.weight projected"] = ours(
        **base, tests=tests, targets=targets_list, method="grad_dot", params="fc.weight",
        memory_budget_mb=0, projection_dim=fc_dim // 4,
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = str(Path(folder) / "model.pt")
        torch.save(model.state_dict(), checkpoint)
        files = {}
        for c, (state, rate) in enumerate(demo.checkpoints):
            files[str(Path(folder) / f"checkpoint-{c}.pt")] = rate
            torch.save(state, str(Path(folder) / f"checkpoint-{c}.pt"))
        if "dattri" in args.peers:
            runs["dattri grad-cos"] = dattri_cosine(model, train_set, test_batch)
            comparisons += [
                ("ours grad-cos exact", "dattri grad-cos", "grad-cos"),
                ("ours grad-cos projected", "dattri grad-cos", "grad-cos"),
            ]
        labels = {
            "captum": ("Captum TracInCP", "ours grad-dot exact"),
            "captum_cp": ("Captum TracInCP checkpoints", "ours TracIn-CP exact"),
            "captum_fast": ("Captum TracInCPFast", "ours grad-dot fc.weight"),
            "captum_randproj": ("Captum TracInCPFastRandProj", "ours grad-dot fc.weight"),
        }
        for kind in ("captum", "captum_cp", "captum_fast", "captum_randproj"):
            if kind in args.peers:
                name, mine = labels[kind]
                files_of_kind = files if kind == "captum_cp" else {checkpoint: 1.0}
                runs[name] = captum(kind, model, train_set, test_batch, files_of_kind, fc_dim // 4)
                model.load_state_dict(demo.model.state_dict())  # the final weights again
                comparisons.append((mine, name, "grad-dot"))
                if kind == "captum_randproj":
                    comparisons.append(("ours grad-dot fc.weight projected", name, "grad-dot"))
    print_header(args, n, tests)
    print()
    print(f"{'method':36} {'build/set-up s':>14} {'per query s':>12} {'query vs ours':>14}")
    reference = runs["ours grad-cos exact"][2]
    for name, (_, build, query) in runs.items():
        print(f"{name:36} {build:14.2f} {query:12.4f} {query / reference:13.1f}x")
    print()
    header = f"{'ours':36} {'peer':30} {'Spearman mean/min':>18} {'top-k overlap mean/min':>23}"
    print(header)
    for mine, theirs, _ in comparisons:
        a = agreement(runs[mine][0], runs[theirs][0].to(runs[mine][0]), args.k)
        print(
            f"{mine:36} {theirs:30} {a['rho_mean']:9.5f}/{a['rho_min']:.5f} "
            f"{a['overlap_mean']:13.3f}/{a['overlap_min']:.3f}"
        )
    if args.quanda:
        print_quanda_table(demo, tests, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
