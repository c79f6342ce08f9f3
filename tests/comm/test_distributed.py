"""Compressors in real 2-process gloo groups: parity, hook vs strategy, determinism, training."""

from __future__ import annotations

import torch

from dtune import train
from tests.comm import _loops as L


def _assert_same(got: list[list[torch.Tensor]], want: list[list[torch.Tensor]], atol: float) -> None:
    for step_got, step_want in zip(got, want, strict=True):
        for a, b in zip(step_got, step_want, strict=True):
            torch.testing.assert_close(a, b, atol=atol, rtol=0)


def test_every_compressor_at_a_lossless_setting_equals_plain_allreduce():
    results = train.launch(L.lossless_parity, workers=2, config={"bucket_mb": [25.0, 0.0005]}).value
    for bucket_mb, out in results.items():  # one bucket; several
        for name in L.LOSSLESS:
            atol = 1e-5 if name == "powersgd" else 0.0  # P Q^T of a full-rank factorization rounds
            _assert_same(out[name], out["plain"], atol=atol)
            assert out[name + "/stats"]["comm_steps"] == 3
        buckets = len([k for k in out["topk/stats"] if k.startswith("comm_bucket")])
        assert buckets == 1 if bucket_mb > 1 else buckets > 1


def test_fp16_and_bf16_equal_pytorchs_hooks_compose_with_its_wrapper_and_quantized_values_are_exact():
    out = train.launch(L.torch_cast_hooks, workers=2).value
    # PyTorch casts, then divides by the world size in fp16; dtune divides in fp32, then casts:
    # the two round differently only where fp16 is subnormal (< 6.1e-5)
    _assert_same(out["fp16/dtune"], out["fp16/torch"], atol=2**-20)
    _assert_same(out["bf16/dtune"], out["bf16/torch"], atol=0.0)
    assert out["wrapped/dtype"] == "torch.float16"  # the dtune hook ran on the fp16 bucket
    for got_step, want_step in zip(out["wrapped"], out["plain"], strict=True):
        for got, want in zip(got_step, want_step, strict=True):
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-2)
    out = train.launch(L.crafted_lossless, workers=2).value
    torch.testing.assert_close(*out["qsgd"], atol=0, rtol=0)
    for got, want in out["sign"]:
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert out["sign_residual"] == [0.0]


def test_ddp_hook_and_allreduce_strategy_give_the_same_gradients():
    out = train.launch(L.hook_vs_strategy, workers=2, config={"bucket_mb": 0.001}).value
    for name, (hook, strategy, state_keys) in out.items():
        _assert_same(strategy, hook, atol=0.0)
        assert state_keys == ["buckets", "memory", "step"], name


def test_training_with_each_compressor_reduces_the_loss_and_is_deterministic_across_ranks():
    steps = 40
    out = train.launch(L.train_each, workers=2, config={"steps": steps, "bucket_mb": 0.001}).value
    baseline = sum(out["none"][0]["losses"][-10:]) / 10
    for name, (first, second) in out.items():
        start, end = first["losses"][0], sum(first["losses"][-10:]) / 10
        assert end < 0.35 * start, f"{name}: loss {start:.3f} -> {end:.3f}"
        assert end < baseline + 0.15, f"{name}: {end:.3f} vs uncompressed {baseline:.3f}"
        rank0, rank1 = first["replicas"]
        assert torch.equal(rank0, rank1), f"{name}: replicas diverged"
        assert first["losses"] == second["losses"] and torch.equal(rank0, second["replicas"][0]), name
        if name != "none":
            assert first["stats"]["comm_steps"] == steps
            assert first["stats"]["comm_bytes_sent_per_step"] > 0
