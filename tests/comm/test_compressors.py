"""Compressors in one process: the API every compressor passes, mass conservation, accounting."""

from __future__ import annotations

import dataclasses
import doctest
import importlib
import math
import pickle
import pkgutil

import numpy as np
import pytest
import torch

from dtune import comm

# a bucket as DDP lays one out: matrices, biases, an odd-sized tail
SHAPES = (torch.Size([96, 40]), torch.Size([96]), torch.Size([7, 96]), torch.Size([7]))
NUMEL = sum(s.numel() for s in SHAPES)

EVERY = {
    "fp32": comm.Cast(precision=comm.Precision.FP32),
    "fp16": comm.FP16(),
    "bf16": comm.BF16(),
    "topk": comm.TopK(ratio=0.02),
    "topk_exact": comm.TopK(ratio=0.02, selection=comm.Selection.EXACT),
    "randomk": comm.RandomK(ratio=0.02),
    "qsgd4": comm.QSGD(levels=7),
    "qsgd8": comm.QSGD(levels=100, chunk_size=100),
    "efsign": comm.EFSignSGD(),
    "powersgd": comm.PowerSGD(rank=2),
    "threshold": comm.Threshold(ratio=0.02, refresh_every=3),
}
WITH_MEMORY = [name for name, c in EVERY.items() if c.error_feedback]


def _grads(step: int, shapes: tuple[torch.Size, ...] = SHAPES) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(step)
    return [torch.randn(s, generator=generator) for s in shapes]


def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


@pytest.mark.parametrize("name", list(EVERY))
def test_every_compressor_meets_the_contract(name):
    compressor = EVERY[name]
    assert isinstance(compressor, comm.Compressor) and isinstance(compressor.collective, comm.Collective)
    with pytest.raises(dataclasses.FrozenInstanceError):
        compressor.ratio = 0.5  # hyperparameters are frozen; state lives elsewhere
    state, hook = compressor.ddp_hook()
    assert isinstance(state, comm.CommState) and callable(hook) and state.compressor is compressor
    grads = _grads(0)
    state.all_reduce(grads)
    assert all(torch.isfinite(g).all() and g.shape == s for g, s in zip(grads, SHAPES, strict=True))
    stats = compressor.stats()
    assert stats == state.stats() and stats["comm_steps"] == 1
    assert stats["comm_bytes_dense_per_step"] == 4 * NUMEL and stats["comm_bytes_sent_per_step"] > 0
    assert stats["comm_compress_ms_per_step"] > 0
    clone = pickle.loads(pickle.dumps(compressor))  # configs travel to workers without their state
    assert clone == compressor and clone.stats()["comm_steps"] == 0


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: comm.TopK(ratio=0), r"The value of `ratio` is 0, but must be in \(0, 1\]\."),
        (lambda: comm.TopK(ratio=1.5), r"The value of `ratio` is 1.5, but must be in \(0, 1\]\."),
        (lambda: comm.TopK(oversample=0.5), r"The value of `oversample` is 0.5, but must be >= 1\."),
        (lambda: comm.RandomK(ratio=-0.1), r"The value of `ratio` is -0.1, but must be in \(0, 1\]\."),
        (lambda: comm.QSGD(levels=0), r"The value of `levels` is 0, but must be in \[1, 127\]\."),
        (lambda: comm.QSGD(levels=128), r"The value of `levels` is 128, but must be in \[1, 127\]\."),
        (lambda: comm.QSGD(chunk_size=0), r"The value of `chunk_size` is 0, but must be >= 1\."),
        (lambda: comm.PowerSGD(rank=0), r"The value of `rank` is 0, but must be >= 1\."),
        (lambda: comm.PowerSGD(min_compression_rate=-1), r"`min_compression_rate` is -1, but must be >= 0\."),
        (lambda: comm.Threshold(refresh_every=0), r"The value of `refresh_every` is 0, but must be >= 1\."),
        (lambda: comm.ResidualMemory(decay=2), r"The value of `decay` is 2, but must be in \[0, 1\]\."),
    ],
)
def test_bad_hyperparameters_fail_at_construction_with_the_value(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_wrong_types_are_refused():
    with pytest.raises(TypeError, match="`selection` must be a Selection"):
        comm.TopK(selection="exact")
    with pytest.raises(TypeError, match="`precision` must be a Precision"):
        comm.Cast(precision="fp16")
    with pytest.raises(TypeError, match="`ratio` must be a number"):
        comm.RandomK(ratio="0.1")
    with pytest.raises(TypeError, match="`rank` must be an integer"):
        comm.PowerSGD(rank=2.0)
    with pytest.raises(TypeError, match="`compressor` must be a dtune.comm.Compressor"):
        comm.CommState("topk")
    with pytest.raises(TypeError, match="`memory` must be a dtune.comm.Memory"):
        comm.CommState(comm.TopK(), memory={})


@pytest.mark.parametrize("name", WITH_MEMORY)
def test_error_feedback_conserves_mass(name):
    """What is sent plus what is kept equals the gradient plus what was kept before."""
    state = comm.CommState(EVERY[name])
    assert isinstance(state.memory, comm.ResidualMemory)
    for step in range(4):
        before = state.memory.residuals.get(0, torch.zeros(NUMEL))
        grads = _grads(step)
        total = _flat(grads) + before
        state.all_reduce(grads)
        sent, kept = _flat(grads), state.memory.residuals[0]
        torch.testing.assert_close(sent + kept, total, atol=2e-6, rtol=0)
        assert kept.abs().sum() > 0  # lossy: something was held back


def test_without_memory_what_is_dropped_is_lost_and_decay_scales_the_residual():
    state = comm.CommState(comm.TopK(ratio=0.02), memory=comm.NoMemory())
    grads = _grads(0)
    state.all_reduce(grads)
    assert (_flat(grads) != 0).sum() == round(0.02 * NUMEL)
    decayed = comm.CommState(comm.TopK(ratio=0.02), memory=comm.ResidualMemory(decay=0.5))
    decayed.all_reduce(_grads(0))
    residual = decayed.memory.residuals[0].clone()
    grads = _grads(1)
    expected_input = _flat(grads) + 0.5 * residual
    decayed.all_reduce(grads)
    torch.testing.assert_close(_flat(grads) + decayed.memory.residuals[0], expected_input)


@pytest.mark.parametrize(
    "compressor",
    [
        comm.Cast(precision=comm.Precision.FP32),
        comm.TopK(ratio=1.0),
        comm.RandomK(ratio=1.0),
        comm.Threshold(ratio=1.0, refresh_every=1),
        comm.PowerSGD(rank=200, min_compression_rate=0),
    ],
    ids=lambda c: type(c).__name__,
)
def test_lossless_settings_return_the_input(compressor):
    state = comm.CommState(compressor)
    for step in range(3):
        grads = _grads(step)
        want = [g.clone() for g in grads]
        state.all_reduce(grads)
        for got, exp in zip(grads, want, strict=True):
            torch.testing.assert_close(
                got, exp, atol=1e-5 if isinstance(compressor, comm.PowerSGD) else 0, rtol=0
            )


def test_sampled_top_k_keeps_exactly_the_top_k_at_a_fraction_of_the_work():
    shapes = (torch.Size([200_000]),)
    exact = comm.CommState(comm.TopK(ratio=0.01, selection=comm.Selection.EXACT))
    sampled = comm.CommState(comm.TopK(ratio=0.01))
    for step in range(3):
        a, b = _grads(step, shapes), _grads(step, shapes)
        exact.all_reduce(a)
        sampled.all_reduce(b)
        assert torch.equal(a[0], b[0]) and (a[0] != 0).sum() == 2000
    assert sampled.buckets[0].data["exact_fallbacks"] == 0


def test_sampled_top_k_falls_back_to_the_exact_top_k_when_the_sample_misleads():
    # k = n - 4: only a sample whose minimum is among the 4 smallest entries would do
    values = torch.randperm(40_000, generator=torch.Generator().manual_seed(0)).float()
    state = comm.CommState(comm.TopK(ratio=0.9999))
    grads = [values.clone()]
    state.all_reduce(grads)
    assert state.buckets[0].data["exact_fallbacks"] == 1
    assert torch.equal(grads[0] == 0, values < 4)


def test_random_k_draws_the_same_indices_on_every_rank_and_other_ones_per_seed():
    compressor = comm.RandomK(ratio=0.01)

    def indices(rank, seed):
        bucket = comm.BucketState(index=0, shapes=SHAPES, rank=rank, world_size=2, seed=seed)
        return [compressor.indices(bucket) for _ in range(3)]

    rank0, rank1, other = indices(0, 7), indices(1, 7), indices(0, 8)
    assert all(torch.equal(a, b) for a, b in zip(rank0, rank1, strict=True))
    assert not torch.equal(rank0[0], other[0]) and not torch.equal(rank0[0], rank0[1])
    k = round(0.01 * NUMEL)
    assert all(0.97 * k <= len(i) <= k and torch.equal(i, i.unique()) for i in rank0)


def test_qsgd_is_unbiased_and_lands_on_its_levels():
    compressor = comm.QSGD(levels=3, chunk_size=8)
    x = torch.randn(64, generator=torch.Generator().manual_seed(0))
    norms = x.view(-1, 8).norm(dim=1).repeat_interleave(8)
    state = comm.CommState(compressor)
    draws = []
    for _ in range(3000):
        grads = [x.clone()]
        state.all_reduce(grads)
        draws.append(grads[0])
    draws_t = torch.stack(draws)
    levels = draws_t / norms * 3
    torch.testing.assert_close(levels, levels.round(), atol=1e-4, rtol=0)
    assert levels.abs().max() <= 3 + 1e-4
    # the mean of 3000 draws is within 5 standard errors of x (each draw's spread <= |x| / 3)
    assert ((draws_t.mean(0) - x).abs() <= 5 * (norms / 3) / math.sqrt(3000)).all()


@pytest.mark.parametrize(
    ("compressor", "sent"),
    [
        (comm.FP16(), 2 * NUMEL),
        (comm.TopK(ratio=0.02), 8 * round(0.02 * NUMEL)),
        (comm.QSGD(levels=7, chunk_size=512), 4 * math.ceil(NUMEL / 512) + math.ceil(NUMEL / 2)),
        (comm.QSGD(levels=9, chunk_size=512), 4 * math.ceil(NUMEL / 512) + NUMEL),
        (comm.EFSignSGD(), 4 * len(SHAPES) + math.ceil(NUMEL / 8)),
        # rank 2 of 96x40 and 7x96 (both pay at rate 2); biases as they are
        (comm.PowerSGD(rank=2), 4 * ((96 + 40) * 2 + (7 + 96) * 2 + 96 + 7)),
    ],
    ids=lambda c: type(c).__name__ if isinstance(c, comm.Compressor) else "",
)
def test_bytes_handed_to_collectives_are_counted_exactly(compressor, sent):
    state = comm.CommState(compressor)
    for step in range(2):
        state.all_reduce(_grads(step))
    stats = state.stats()
    assert stats["comm_bytes_sent_per_step"] == sent == stats["comm_bucket0_bytes_sent_per_step"]
    assert stats["comm_compression_ratio"] == pytest.approx(4 * NUMEL / sent)
    assert stats["comm_collectives_per_step"] == (2 if isinstance(compressor, comm.PowerSGD) else 1)


def test_threshold_is_refreshed_every_l_steps_and_sends_what_passes_it():
    state = comm.CommState(comm.Threshold(ratio=0.02, refresh_every=3))
    thresholds, sent = [], []
    for step in range(7):
        grads = _grads(step)
        state.all_reduce(grads)
        data = state.buckets[0].data
        thresholds.append(data["threshold"])
        sent.append(data["sent"])
        assert (_flat(grads) != 0).sum() == data["sent"]
    assert thresholds[0] == thresholds[1] == thresholds[2] != thresholds[3] == thresholds[5] != thresholds[6]
    assert sent[0] == round(0.02 * NUMEL) and sent[3] == round(0.02 * NUMEL)
    assert sent[2] > sent[0]  # error feedback grows |g + e| until the next refresh
    assert state.stats()["comm_bytes_sent_total"] == 8 * sum(sent)


def test_powersgd_local_round_trip_equals_its_one_process_exchange_and_keeps_biases_exact():
    compressor = comm.PowerSGD(rank=1)
    assert compressor.compressed(torch.Size([96, 40])) and not compressor.compressed(torch.Size([96]))
    assert not comm.PowerSGD(rank=4).compressed(torch.Size([7, 10]))  # (7+10)*4*2 >= 70
    bucket = comm.BucketState(index=0, shapes=SHAPES, rank=0, world_size=1, seed=0)
    compressor.init_bucket(bucket)
    grads = _flat(_grads(0))
    local = compressor.decompress(compressor.compress(grads, bucket), bucket, torch.empty(NUMEL))
    state = comm.CommState(compressor)
    tensors = _grads(0)
    state.all_reduce(tensors)
    torch.testing.assert_close(_flat(tensors), local, atol=1e-6, rtol=0)
    torch.testing.assert_close(tensors[1], _grads(0)[1], atol=0, rtol=0)
    assert torch.linalg.matrix_rank(tensors[0]) == 1
    zero = [torch.zeros(96, 40)]
    comm.CommState(comm.PowerSGD(rank=2, min_compression_rate=0)).all_reduce(zero)
    assert torch.equal(zero[0], torch.zeros(96, 40))


@pytest.mark.parametrize("name", list(EVERY))
def test_state_dict_resumes_exactly(name):
    def run(state, steps):
        out = []
        for step in steps:
            grads = _grads(step)
            state.all_reduce(grads)
            out.append(_flat(grads))
        return out

    original = comm.CommState(EVERY[name])
    run(original, range(3))
    saved = pickle.loads(pickle.dumps(original.state_dict()))
    restored = comm.CommState(dataclasses.replace(EVERY[name]))
    restored.load_state_dict(saved)
    for a, b in zip(run(original, range(3, 6)), run(restored, range(3, 6)), strict=True):
        assert torch.equal(a, b)


def test_a_bucket_whose_layout_changes_starts_over():
    state = comm.CommState(comm.TopK(ratio=0.1))
    state.all_reduce(_grads(0))
    assert 0 in state.memory.residuals
    state.exchange(0, torch.randn(10), (torch.Size([10]),)).wait()  # DDP rebuilt bucket 0
    assert state.buckets[0].shapes == (torch.Size([10]),) and state.memory.residuals[0].shape == (10,)


def test_stats_before_any_use_are_zero():
    stats = comm.TopK().stats()
    assert stats["comm_steps"] == 0 and stats["comm_bytes_sent_total"] == 0


def test_docstring_examples_run():
    import dtune.comm

    for info in pkgutil.iter_modules(dtune.comm.__path__):
        module = importlib.import_module(f"dtune.comm.{info.name}")
        result = doctest.testmod(module)
        assert result.failed == 0, info.name


GATHERED = ["topk", "topk_exact", "qsgd4", "qsgd8", "efsign", "threshold"]


@pytest.mark.parametrize("name", GATHERED)
def test_every_rank_sums_the_gathered_payloads_to_the_same_bits(name):
    """Three ranks' payloads aggregated on each rank: float sums must round alike everywhere."""
    compressor, world = EVERY[name], 3
    buckets = [
        comm.BucketState(index=0, shapes=SHAPES, rank=r, world_size=world, seed=0) for r in range(world)
    ]
    payloads = []
    for rank, bucket in enumerate(buckets):
        compressor.init_bucket(bucket)
        grads = _flat(_grads(rank)) * (rank + 1)  # ranks of different scales round differently
        payloads.append(compressor.compress(grads, bucket))
    results = []
    for rank, bucket in enumerate(buckets):
        gathered = [comm.Payload(p.tensor.clone(), payloads[rank].meta) for p in payloads]
        results.append(compressor.aggregate(gathered, bucket, torch.empty(NUMEL)))
    assert all(torch.equal(results[0], other) for other in results[1:])


def test_qsgd_rounds_with_16_bit_uniforms_bit_for_bit():
    """Levels are floor(z + r / 2**16) with r the generator's raw 16-bit words, in float32."""
    compressor = comm.QSGD(levels=7, chunk_size=100)
    bucket = comm.BucketState(index=0, shapes=(torch.Size([1000]),), rank=0, world_size=1, seed=3)
    compressor.init_bucket(bucket)
    reference = np.random.Generator(np.random.SFC64())
    reference.bit_generator.state = bucket.data["rng"].bit_generator.state
    x = torch.randn(1000, generator=torch.Generator().manual_seed(1))
    levels = compressor.compress(x, bucket).meta
    noise = torch.from_numpy(reference.bit_generator.random_raw(250).view(np.uint16).astype(np.float32))
    z = x.view(10, 100) * (7 / x.view(10, 100).norm(dim=1, keepdim=True))
    assert torch.equal(levels, (z.reshape(-1) + noise / 2**16).floor())


@pytest.mark.parametrize("levels", [7, 100])
def test_qsgd_decodes_every_code(levels):
    """Every byte of 4-bit codes (two nibbles, each level + 8) and of int8 levels decodes exactly."""
    compressor = comm.QSGD(levels=levels, chunk_size=1 << 20)
    numel = 512 if levels <= 7 else 256
    bucket = comm.BucketState(index=0, shapes=(torch.Size([numel]),), rank=0, world_size=1, seed=0)
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    if levels <= 7:
        codes = torch.cat([codes, codes])[: numel // 2]
        want = torch.stack([(codes & 15).float() - 8, (codes >> 4).float() - 8], dim=1).reshape(-1)
    else:
        want = codes.view(torch.int8).float()
    norm = torch.tensor([float(levels)])  # step ||chunk|| / s = 1: the levels themselves
    payload = comm.Payload(torch.cat([norm.view(torch.uint8), codes]))
    assert torch.equal(compressor.decompress(payload, bucket, torch.empty(numel)), want)


def test_qsgd_folds_the_world_size_into_its_norms_bit_for_bit():
    compressor, x = comm.QSGD(levels=7, chunk_size=64), _flat(_grads(0))

    def payload(world, undivided):
        bucket = comm.BucketState(index=0, shapes=SHAPES, rank=0, world_size=world, seed=0)
        compressor.init_bucket(bucket)
        if undivided:
            return compressor.compress_undivided(x.clone(), bucket).tensor.clone()
        return compressor.compress(x / world, bucket).tensor.clone()

    for world in (2, 4, 3):  # 3: not a power of 2, divided first
        assert torch.equal(payload(world, True), payload(world, False)), world


@pytest.mark.parametrize("world", [1, 2, 3])
def test_residual_memory_divides_by_the_world_size_as_a_division_would(world):
    memory, x, residual = comm.ResidualMemory(), _flat(_grads(0)), _flat(_grads(1))
    bucket = comm.BucketState(index=0, shapes=SHAPES, rank=0, world_size=world, seed=0)
    assert torch.equal(memory.compensate(x, bucket), x / world)  # first step: nothing held back
    memory.update(residual.clone(), bucket)
    assert torch.equal(memory.compensate(x, bucket), residual + x / world)
    assert torch.equal(comm.NoMemory().compensate(x.clone(), bucket), x / world)


@pytest.mark.parametrize("selection", list(comm.Selection))
def test_top_k_breaks_ties_at_the_kth_value_toward_the_lowest_positions(selection):
    # 60,000 entries on 8 values: the k-th largest is tied with thousands of others
    values = (torch.randperm(60_000, generator=torch.Generator().manual_seed(1)) % 8).float()
    k = 10_000
    order = sorted(range(values.numel()), key=lambda i: (-values[i].item(), i))
    want = torch.zeros_like(values)
    want[order[:k]] = values[order[:k]]
    grads = [values.clone()]
    comm.CommState(
        comm.TopK(ratio=k / values.numel(), selection=selection), memory=comm.NoMemory()
    ).all_reduce(grads)
    assert torch.equal(grads[0], want)


def test_sign_sends_both_zeros_as_plus_one():
    state = comm.CommState(comm.EFSignSGD())
    grads = [torch.tensor([0.0, -0.0, 2.0, -2.0])]  # mean |g| = 1
    state.all_reduce(grads)
    assert grads[0].tolist() == [1.0, 1.0, 1.0, -1.0]
    assert state.memory.residuals[0].tolist() == [-1.0, -1.0, 1.0, -1.0]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", list(EVERY))
def test_half_precision_buckets_are_compressed_in_their_dtype(name, dtype):
    """DDP buckets of fp16/bf16 models (numpy has no bfloat16: the numpy paths must not see one)."""
    state = comm.CommState(EVERY[name])
    for numel in (NUMEL, 40_001):  # 40,001: past top-k's exact-selection cut-off
        for step in range(2):
            grads = [torch.randn(numel, generator=torch.Generator().manual_seed(step)).to(dtype)]
            state.all_reduce(grads, bucket=numel)
            assert grads[0].dtype == dtype and torch.isfinite(grads[0]).all() and grads[0].abs().sum() > 0
