"""The % of peak benchmark's code (`benchmarks/perf/peak.py`): FLOPs counted by trip count,
batches in the replay format, and the whole benchmark at tiny sizes (no timing asserted)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mbxfer.agents import networks
from mbxfer.benchmarks.perf import peak


def _scanned_matmuls(x, w):
    def body(carry, _):
        inner = jax.lax.scan(lambda c, _: (c @ w, None), carry, None, length=3)[0]
        return jnp.tanh(inner), None

    return jnp.sum(jax.lax.scan(body, x, None, length=5)[0])


def test_unrolled_flops_count_every_trip_of_nested_scans():
    x, w = jnp.ones((8, 32)), jnp.ones((32, 32))
    matmul = 2 * 8 * 32 * 32
    rolled = peak.rolled_flops(_scanned_matmuls, x, w)
    unrolled = peak.unrolled_flops(_scanned_matmuls, x, w)
    assert rolled < 2 * matmul  # XLA counts each body once
    assert 15 * matmul <= unrolled < 16 * matmul  # 5 x 3 matmuls, plus elementwise ops
    gradient = jax.grad(_scanned_matmuls, argnums=1)
    # Backward: each step's matmul has two more (w.r.t. the carry and w.r.t. w).
    assert 45 * matmul <= peak.unrolled_flops(gradient, x, w) < 48 * matmul
    assert peak.unrolled_flops(gradient, x, w, compiled=True) >= 45 * matmul


def test_every_decoder_and_conv_is_timed():
    assert peak.DECODERS == networks.UPSAMPLES
    assert set(peak.CONVS) == set(networks.CONV_IMPLS)
    assert {upsample for upsample, _ in peak.VARIANTS} == set(networks.UPSAMPLES)
    assert {conv for _, conv in peak.VARIANTS} == set(networks.CONV_IMPLS)
    assert peak.VARIANTS[0] == ("transpose", "xla")  # the original layers: the baseline


def test_random_batch_has_the_replay_format():
    setting_spec = peak.quick_setting().env_spec
    batch = peak.random_batch(setting_spec, 3, 5)
    image = setting_spec.observations["image"]
    assert batch["observation"]["image"].shape == (3, 5) + image.shape
    assert batch["observation"]["image"].dtype == np.uint8
    assert batch["action"].shape == (3, 5) and batch["action"].dtype == np.int32
    assert batch["action"].max() < setting_spec.actions.num_values
    assert batch["is_first"][:, 0].all() and not batch["is_first"][:, 1:].any()
    assert set(batch) == {"observation", "action", "reward", "discount", "is_first", "is_last",
                          "is_terminal"}  # fmt: skip
    for key in ("reward", "discount", "is_last", "is_terminal"):
        assert batch[key].shape == (3, 5), key


@pytest.mark.slow
def test_quick_benchmark_runs_every_part(capsys):
    (result,) = peak.main(["--quick", "--rounds", "1"])
    names = [row["name"].strip() for row in result["rows"]]
    assert names[0].startswith("dreamer update [transpose, xla]")
    assert any(name.startswith("search") for name in names)
    assert all(row["gflop"] > 0 and row["seconds"] > 0 for row in result["rows"])
    assert set(result["decoder_speedups"]) == {
        "transpose_subpixel, xla",
        "transpose_subpixel, matmul",
        "depth_to_space, matmul",
    }
    assert all(s["percent_of_peak_model_flops"] > 0 for s in result["decoder_speedups"].values())
    assert any(name.startswith("encoder fwd+bwd [xla]") for name in names)
    assert any(name.startswith("muzero update [xla convs]") for name in names)
    assert "Dreamer update speedup over [transpose, xla]" in capsys.readouterr().out
