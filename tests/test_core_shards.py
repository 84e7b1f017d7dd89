"""The sharded gradient index: shards and manifest on disk, resume after a kill, corrupt shards,
float16 storage, memory mapping, DataLoader workers, builds split across processes and jobs."""

from __future__ import annotations

import gc
import json
import math
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil
import pytest
import torch
from precision import float32_cosine_tolerance, gamma, unit_roundoff
from shard_engines import NUM_PARAMS, NUM_TRAIN, ROWS_PER_SHARD, shard_mb, small

from tfa_widgets.core.errors import IndexCacheError, InputError
from tfa_widgets.core.index import GradientIndex
from tfa_widgets.core.shards import (
    ShardedIndex,
    ShardLayout,
    load_or_build_sharded,
    read_manifest,
    shard_path,
    write_shard,
)

pytestmark = pytest.mark.portability

ROOT = Path(__file__).resolve().parents[1]
NUM_SHARDS = math.ceil(NUM_TRAIN / ROWS_PER_SHARD)


def index_directory(cache_dir: Path) -> Path:
    found = [path for path in cache_dir.glob("gradient-index-*") if path.is_dir()]
    assert len(found) == 1, found
    return found[0]


def same_up_to_threads(first: torch.Tensor, second: torch.Tensor, norms: torch.Tensor) -> None:
    """Features computed in float64 and stored in float32 by two processes whose thread counts
    (so reduction orders) may differ: a float64 difference of at most ``gamma(P)`` times the
    gradient's norm, then one float32 rounding each (at most one unit in the last place)."""
    torch.testing.assert_close(
        first,
        second,
        rtol=2 * unit_roundoff(torch.float32),
        atol=gamma(NUM_PARAMS, torch.float64) * float(norms.max()),
    )


def in_memory_features() -> tuple[torch.Tensor, torch.Tensor]:
    index = small(cache_dir=None).build_index()
    assert isinstance(index, GradientIndex)
    return index.features, index.norms


# ---------------------------------------------------------------- layout and scores
def test_an_index_larger_than_a_shard_is_stored_as_shards_and_scores_like_one_in_memory(tmp_path):
    engine = small(tmp_path)
    index = engine.build_index()
    assert isinstance(index, ShardedIndex) and engine.index_builds == 1
    directory = index_directory(tmp_path)
    names = sorted(path.name for path in directory.iterdir())
    assert names == ["manifest.json"] + [f"shard-{s:05d}.safetensors" for s in range(NUM_SHARDS)]
    manifest = read_manifest(directory)
    assert manifest["complete"] and len(manifest["shards"]) == NUM_SHARDS
    assert manifest["layout"]["rows_per_shard"] == ROWS_PER_SHARD
    assert manifest["layout"]["fingerprint"] == index.fingerprint
    assert [first for first, _, _ in index.chunks()] == [0, 6, 12, 18]
    assert [first for first, _, _ in index.chunks(rows=4)] == [0, 4, 6, 10, 12, 16, 18]
    features, norms = in_memory_features()
    same_up_to_threads(index.features, features, norms)
    torch.testing.assert_close(index.norms, norms, rtol=2 * unit_roundoff(), atol=0)
    reference = small(cache_dir=None)
    torch.testing.assert_close(
        engine.scores([0, 1]), reference.scores([0, 1]), rtol=1e-5, atol=1e-6
    )
    assert torch.equal(engine.top_k(0, 5)[0], reference.top_k(0, 5)[0])
    again = small(tmp_path)
    again.build_index()
    assert again.index_builds == 0


# Batches of one shard each, so a one-file build computes the same batches as a sharded one.
LOGRA = {"memory_budget_mb": 0, "projection_dim": 48, "projection": "logra", "batch_size": 6}


def logra_settings() -> dict:
    """LoGra settings whose shards hold `ROWS_PER_SHARD` rows (the width is the projector's)."""
    width = small(cache_dir=None, **LOGRA).build_index().features.shape[1]
    return {**LOGRA, "shard_mb": shard_mb(width=width)}


def test_a_logra_index_is_sharded_with_its_projection_and_the_rows_of_one_file(tmp_path):
    one_file = small(cache_dir=None, **LOGRA)
    reference = one_file.build_index()
    engine = small(tmp_path, **logra_settings())
    index = engine.build_index()
    assert isinstance(index, ShardedIndex) and index.shard_layout.num_shards == NUM_SHARDS
    layout = read_manifest(index_directory(tmp_path))["layout"]
    assert layout["projection"] == index.projection == reference.projection == "logra"
    assert layout["projection_dim"] == 48 and layout["width"] == reference.features.shape[1]
    assert layout["projection_layout"] == index.layout == [list(e) for e in reference.layout]
    # Batches of one shard each: both builds run the same code on the same batches.
    assert torch.equal(index.features, reference.features)
    assert torch.equal(index.norms, reference.norms)
    # The index remakes the projector from its manifest: queries are projected alike, and
    # top_k re-scores exactly (the same rows, scores within the float32 cosine bound).
    test_grad = engine._test_gradients.get(engine._model_term, engine.query(0, 1))
    torch.testing.assert_close(index.project_query(test_grad), reference.project_query(test_grad))
    indices, values = engine.top_k(0, 5)
    ref_indices, ref_values = one_file.top_k(0, 5)
    assert torch.equal(indices, ref_indices)
    bound = float32_cosine_tolerance(NUM_PARAMS)
    torch.testing.assert_close(values, ref_values, **{k: 2 * v for k, v in bound.items()})
    sketch = small(tmp_path, **{**logra_settings(), "projection": "countsketch"}).build_index()
    assert sketch.projection == "countsketch" and sketch.fingerprint != index.fingerprint


def test_an_in_memory_index_gives_its_rows_in_chunks():
    features, norms = torch.randn(10, 7), torch.rand(10)
    index = GradientIndex(features, norms, fingerprint="0" * 64)
    chunks = list(index.chunks(rows=3))
    assert [first for first, _, _ in chunks] == [0, 3, 6, 9]
    assert torch.equal(torch.cat([rows for _, rows, _ in chunks]), features)  # views, no arithmetic
    assert torch.equal(torch.cat([n for _, _, n in chunks]), norms)
    assert len(list(index.chunks())) == 1
    assert torch.equal(index.project_query(features[:2]), features[:2])


def test_a_small_index_stays_one_file(tmp_path):
    small(tmp_path, shard_mb=64).build_index()
    assert len(list(tmp_path.glob("gradient-index-*.safetensors"))) == 1
    assert not [path for path in tmp_path.glob("gradient-index-*") if path.is_dir()]


# ---------------------------------------------------------------- interrupted builds
INTERRUPTED = textwrap.dedent(
    """
    import json, os, signal, sys
    sys.path.insert(0, sys.argv[2])
    from shard_engines import small
    from tfa_widgets.core import shards

    real, written = shards.write_shard, []

    def write_then_stop(*args, **kwargs):
        written.append(real(*args, **kwargs))
        if len(written) == 2:
            os.kill(os.getpid(), getattr(signal, sys.argv[3]))
        return written[-1]

    shards.write_shard = write_then_stop
    small(sys.argv[1], **json.loads(sys.argv[4])).build_index()
    """
)


@pytest.mark.parametrize(
    ("stop", "projection"), [("SIGKILL", "exact"), ("SIGINT", "exact"), ("SIGKILL", "logra")]
)
def test_an_interrupted_build_resumes_from_its_complete_shards(tmp_path, stop, projection):
    settings = logra_settings() if projection == "logra" else {}
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    script = [sys.executable, "-c", INTERRUPTED, str(tmp_path), str(ROOT / "tests"), stop]
    script.append(json.dumps(settings))
    stopped = subprocess.run(script, env=env, capture_output=True, text=True, timeout=300)
    assert stopped.returncode != 0, stopped.stderr
    if stop == "SIGKILL":
        assert stopped.returncode == -signal.SIGKILL
    else:
        assert "KeyboardInterrupt" in stopped.stderr
    directory = index_directory(tmp_path)
    manifest = read_manifest(directory)  # written after each shard: it may lag by one
    assert not manifest["complete"] and set(manifest["shards"]) <= {"0", "1"}
    assert sorted(path.name for path in directory.glob("shard-*")) == [
        "shard-00000.safetensors",
        "shard-00001.safetensors",
    ]
    assert not list(directory.glob(".*.tmp")), "a Ctrl-C left a temporary file"
    kept = {s: shard_path(directory, s).stat().st_mtime_ns for s in (0, 1)}
    resumed = small(tmp_path, **settings)
    index = resumed.build_index()
    assert index.projection == projection
    assert resumed.index_builds == 1 and read_manifest(directory)["complete"]
    assert {s: shard_path(directory, s).stat().st_mtime_ns for s in (0, 1)} == kept
    uninterrupted = small(tmp_path / "other", **settings).build_index()
    # Bit-identical: every shard is computed from the same batches with the same kernels and
    # thread count (the child process gets this session's TFA_TEST_THREADS and kernels).
    assert torch.equal(index.features, uninterrupted.features)
    assert torch.equal(index.norms, uninterrupted.norms)


def test_a_corrupt_shard_is_recomputed_with_a_warning_and_named_in_the_manifest(tmp_path):
    original = small(tmp_path).build_index()
    features = original.features.clone()
    directory = index_directory(tmp_path)
    path = shard_path(directory, 2)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # inside the tensors, after the header
    path.write_bytes(bytes(data))
    engine = small(tmp_path)
    with pytest.warns(UserWarning, match=r"shard-00002.*checksum mismatch; recomputing"):
        repaired = engine.build_index()
    assert engine.index_builds == 1
    manifest = read_manifest(directory)
    assert manifest["complete"] and manifest["problems"] == {"2": "checksum mismatch"}
    assert torch.equal(repaired.features, features)


def test_a_shard_of_another_layout_is_not_taken(tmp_path):
    small(tmp_path).build_index()
    directory = index_directory(tmp_path)
    manifest = read_manifest(directory)
    manifest["layout"]["rows_per_shard"] = 4  # a manifest that no longer matches its shards
    (directory / "manifest.json").write_text(json.dumps(manifest))
    engine = small(tmp_path)
    with pytest.warns(UserWarning, match="do not match the manifest"):
        index = engine.build_index()
    assert index.shard_layout.rows_per_shard == 4 and len(list(directory.glob("shard-*"))) == 5
    same_up_to_threads(index.features, *in_memory_features())


def test_the_cache_budget_removes_a_least_recently_used_shard_directory(tmp_path):
    small(tmp_path).build_index()
    first = index_directory(tmp_path)
    size = sum(path.stat().st_size for path in first.iterdir())
    other = small(tmp_path, projection_seed=1, cache_budget_mb=1.5 * size / 2**20)
    other.build_index()  # another fingerprint: room for one directory only
    remaining = [path for path in tmp_path.glob("gradient-index-*") if path.is_dir()]
    assert remaining == [other.build_index().directory] and not first.exists()


def test_a_temporary_shard_of_a_dead_build_is_removed(tmp_path):
    small(tmp_path).build_index()
    directory = index_directory(tmp_path)
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True)  # fmt: skip
    host = socket.gethostname().replace(".", "_")
    stale = directory / f".shard-00001.safetensors.{finished.stdout.strip()}@{host}.tmp"
    stale.write_bytes(b"half a shard")
    small(tmp_path, projection_seed=1).build_index()  # any build in the cache cleans up
    assert not stale.exists()


# ---------------------------------------------------------------- storage
def test_float16_storage_errs_within_its_bound_at_any_gradient_scale(tmp_path):
    generator = torch.Generator().manual_seed(0)
    width, rows = 256, 12
    features = torch.randn(rows, width, generator=generator, dtype=torch.float64)
    features *= torch.logspace(-12, 8, rows, dtype=torch.float64)[:, None]  # float16: 6e-8..65504
    layout = ShardLayout("f" * 64, rows, width, rows, dtype="float16")
    write_shard(tmp_path, layout, 0, features.float(), features.norm(dim=1).float())
    index, computed = load_or_build_sharded(tmp_path, layout, None)
    assert computed == []
    query = torch.randn(3, width, generator=generator, dtype=torch.float64)
    dots = index.dots(query).double()
    exact = features @ query.T
    # Each stored coordinate errs by 2^-11 relative or 2^-25 of the row norm absolute
    # (subnormals), then the float32 scaling and the float32 dot product add gamma(width + 2).
    bound = 2**-11 + 2**-25 * math.sqrt(width) + gamma(width + 2)
    scale = features.norm(dim=1)[:, None] * query.norm(dim=1)[None, :]
    assert bool(((dots - exact).abs() <= bound * scale).all())
    assert bool(((dots - exact).abs() > 2**-16 * scale).any()), "not float16: the test is void"


def test_a_float16_index_is_re_scored_exactly_by_top_k(tmp_path):
    half = small(tmp_path, index_dtype="float16", shard_mb=shard_mb(itemsize=2))
    index = half.build_index()
    assert index.shard_layout.dtype == "float16" and index.shard_layout.num_shards == NUM_SHARDS
    assert index.approximate
    reference = small(cache_dir=None)
    exact_indices, exact_scores = reference.top_k(0, 4)
    indices, scores = half.top_k(0, 4)
    assert torch.equal(indices, exact_indices)
    torch.testing.assert_close(scores, exact_scores, rtol=1e-5, atol=1e-6)
    bound = 2**-11 + 2**-25 * math.sqrt(NUM_PARAMS) + 1e-5  # plus float32's part, generously
    assert float((half.scores(0) - reference.scores(0)).abs().max()) <= bound


def test_loading_maps_the_shards_instead_of_reading_them(tmp_path):
    width, rows, shards = 4096, 1024, 8  # 128 MB of float32 features
    layout = ShardLayout("e" * 64, rows * shards, width, rows)
    block = torch.ones(rows, width)
    for shard in range(shards):
        write_shard(tmp_path, layout, shard, block * shard, torch.full((rows,), float(shard)))
    del block
    gc.collect()
    process = psutil.Process()
    before = process.memory_info().rss
    index, _ = load_or_build_sharded(tmp_path, layout, None)
    grown = process.memory_info().rss - before
    size = rows * shards * width * 4
    assert grown < size / 8, f"loading grew RSS by {grown / 2**20:.0f} MB of {size / 2**20:.0f}"
    assert float(index.dots(torch.ones(width))[-1]) == (shards - 1) * width


# ---------------------------------------------------------------- workers
def test_dataloader_workers_give_the_same_index_and_exact_scores(tmp_path):
    serial = small(tmp_path / "serial", memory_budget_mb=0, projection_dim=64)
    workers = small(tmp_path / "workers", memory_budget_mb=0, projection_dim=64, num_workers=2)
    # Same batches, same process, same kernels: bit-identical whoever reads the images.
    assert torch.equal(serial.build_index().features, workers.build_index().features)
    assert torch.equal(serial.scores(0, exact=True), workers.scores(0, exact=True))


# ---------------------------------------------------------------- several processes
def run_index_cli(args: list[str], cache_dir: Path, torchrun: int = 0):
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
        "TFA_SHARD_TEST_DIR": str(cache_dir),
    }
    launcher = [sys.executable, "-m"]
    if torchrun:
        launcher += ["torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}", "-m"]
    command = [*launcher, "tfa_widgets.index", *args, "--engine", "shard_engines:small"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_two_gloo_processes_under_torchrun_build_the_one_process_index(tmp_path):
    output = run_index_cli(["build"], tmp_path, torchrun=2)
    assert f"{NUM_TRAIN} rows x {NUM_PARAMS} (float32) in {NUM_SHARDS} shards" in output
    assert read_manifest(index_directory(tmp_path))["complete"]
    loaded = small(tmp_path)
    index = loaded.build_index()
    assert loaded.index_builds == 0
    one_process = small(tmp_path / "one").build_index()
    same_up_to_threads(index.features, one_process.features, one_process.norms)


def test_parts_then_gather_build_the_one_process_index(tmp_path):
    run_index_cli(["build", "--part", "1/2"], tmp_path)
    directory = index_directory(tmp_path)
    assert sorted(path.name for path in directory.glob("shard-*")) == [
        "shard-00001.safetensors",
        "shard-00003.safetensors",
    ]
    with pytest.raises(IndexCacheError, match=r"lacks 2 of 4 shards \(shard 0: missing"):
        small(tmp_path).gather_index()
    run_index_cli(["build", "--part", "0/2"], tmp_path)
    assert "4 shards" in run_index_cli(["gather"], tmp_path)
    gathered = small(tmp_path)
    index = gathered.build_index()
    assert gathered.index_builds == 0 and read_manifest(directory)["complete"]
    one_process = small(tmp_path / "one").build_index()
    same_up_to_threads(index.features, one_process.features, one_process.norms)


def test_bad_shard_settings_are_named():
    with pytest.raises(InputError, match="index_dtype"):
        small(cache_dir=None, index_dtype="bfloat16")
    with pytest.raises(InputError, match="num_workers"):
        small(cache_dir=None, num_workers=-1)
    with pytest.raises(InputError, match="cache_dir"):
        small(cache_dir=None).build_index_part(0, 2)


def test_a_part_out_of_range_is_named(tmp_path):
    with pytest.raises(InputError, match=r"part must be an integer in \[0, 2\)"):
        small(tmp_path).build_index_part(2, 2)
