"""The kernel's math against float64 references, on tensors shaped like real checkpoints."""

import math

import pytest
import torch
from conftest import misrounded_share, ulp_error

from mergekit.merge_methods import TensorGroup, get
from mergekit_expo.method import decompose, extrapolate


def dpo_like_pair(n=1 << 22, seed=0, change=2e-5):
    """bf16 theta0 ~ N(0, 0.02); theta1 = theta0 + N(0, change) stored in bf16.

    zephyr-7b's DPO change has RMS 6.3e-6 (paper, Table 1): most elements keep
    their bf16 value and the rest move by about one ulp. The default is 3x that.
    """
    g = torch.Generator().manual_seed(seed)
    theta0 = (torch.randn(n, generator=g) * 0.02).to(torch.bfloat16)
    theta1 = (theta0.float() + torch.randn(n, generator=g) * change).to(torch.bfloat16)
    return theta0, theta1


def expo(tensors, base_index=0, **parameters):
    group = TensorGroup.from_tensors(tensors, base_index=base_index, name="w")
    (result,) = get("expo")((group,), parameters=parameters)
    return result


@pytest.mark.parametrize("alpha", [0.1, 0.3, 0.5, 2.5, 8.0])
def test_single_model_is_correctly_rounded(alpha):
    theta0, theta1 = dpo_like_pair()
    out = expo([theta0, theta1], alpha=alpha)
    assert out.dtype == torch.float32
    t0, t1 = theta0.double(), theta1.double()
    exact = t1 + alpha * (t1 - t0)
    stored = out.to(torch.bfloat16)
    assert ulp_error(stored, exact).max() <= 1.0
    wrong = misrounded_share(stored, exact)
    assert wrong <= 1e-6, f"{wrong:.2e} of elements not correctly rounded"
    assert (t1 != t0).double().mean() > 0.1


@pytest.mark.parametrize("alpha", [0.3, 2.5])
def test_large_changes_stay_within_one_ulp(alpha):
    """Changes of many ulps (pretrained -> SFT sized) still round within 1 ulp."""
    theta0, theta1 = dpo_like_pair(change=1e-3)
    out = expo([theta0, theta1], alpha=alpha).to(torch.bfloat16)
    t0, t1 = theta0.double(), theta1.double()
    assert ulp_error(out, t1 + alpha * (t1 - t0)).max() <= 1.0


def test_bf16_task_arithmetic_is_not_correctly_rounded():
    """The imprecision this method exists to avoid is real on the same data."""
    theta0, theta1 = dpo_like_pair()
    exact = theta1.double() + 0.3 * (theta1.double() - theta0.double())
    vanilla = theta0 + 1.3 * (theta1 - theta0)  # bf16 math, as task_arithmetic does
    assert misrounded_share(vanilla, exact) > 1e-4


def test_alpha_zero_and_zero_delta_keep_theta1_bitwise():
    theta0, theta1 = dpo_like_pair(1 << 16)
    assert torch.equal(expo([theta0, theta1], alpha=0.0).to(torch.bfloat16), theta1)
    assert torch.equal(expo([theta1, theta1], alpha=0.7).to(torch.bfloat16), theta1)


def test_several_models_use_the_weighted_mean_delta():
    g = torch.Generator().manual_seed(1)
    theta0, a, b = (torch.randn(64, 32, generator=g, dtype=torch.float64) for _ in range(3))
    out = expo([theta0, a, b], alpha=0.4, weight=[1.0, 3.0])
    delta = (1.0 * (a - theta0) + 3.0 * (b - theta0)) / 4.0
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, theta0 + 1.4 * delta, rtol=0, atol=1e-12)


def test_float64_inputs_compute_in_float64():
    theta0 = torch.full((4,), 1.0, dtype=torch.float64)
    theta1 = theta0 + 1e-12
    out = expo([theta0, theta1], alpha=0.5)
    assert out.dtype == torch.float64
    assert math.isclose((out - theta1)[0].item(), 0.5e-12, rel_tol=1e-3)


def test_base_position_does_not_matter():
    theta0, theta1 = dpo_like_pair(1 << 12)
    assert torch.equal(expo([theta1, theta0], base_index=1, alpha=0.3), expo([theta0, theta1], alpha=0.3))


def test_magnitude_sparsification_keeps_largest_changes():
    theta0 = torch.zeros(1000)
    theta1 = torch.linspace(-1, 1, 1000)
    _, delta = decompose(theta0, [theta1], [1.0], density=[0.1], rescale=False)
    kept = delta != 0
    assert kept.sum() == 100
    assert theta1[kept].abs().min() >= theta1[~kept].abs().max()


def test_random_sparsification_is_seeded_and_rescaled():
    theta0 = torch.zeros(100_000)
    theta1 = torch.ones(100_000)
    torch.manual_seed(3)
    _, first = decompose(theta0, [theta1], [1.0], density=[0.25], sparsification="random")
    torch.manual_seed(3)
    _, second = decompose(theta0, [theta1], [1.0], density=[0.25], sparsification="random")
    assert torch.equal(first, second)
    assert abs((first != 0).float().mean().item() - 0.25) < 0.01
    assert math.isclose(first.sum().item(), theta1.sum().item(), rel_tol=1e-5)


def test_extrapolate_matches_kernel():
    theta0, theta1 = dpo_like_pair(1 << 12)
    aligned, delta = decompose(theta0, [theta1], [1.0])
    assert torch.equal(extrapolate(aligned, delta, 0.3), expo([theta0, theta1], alpha=0.3))


def test_sparsification_prunes_the_extrapolation_not_the_alignment():
    g = torch.Generator().manual_seed(2)
    theta0, a, b = (torch.randn(256, generator=g, dtype=torch.float64) for _ in range(3))
    for aligned in ([a], [a, b]):
        out = expo([theta0, *aligned], alpha=0.5, density=[0.5] * len(aligned), rescale=False)
        mean = sum(aligned) / len(aligned)
        at_mean = torch.isclose(out, mean, rtol=0, atol=1e-12).double().mean().item()
        assert 0.15 < at_mean < 0.6
        bound = 0.5 * sum((t - theta0).abs() for t in aligned) / len(aligned)
        assert ((out - mean).abs() <= bound + 1e-12).all()


@pytest.mark.parametrize(
    "parameters, message",
    [
        ({"alpha": float("nan")}, "alpha must be a finite number"),
        ({"alpha": float("inf")}, "alpha must be a finite number"),
        ({"alpha": -1.0}, "greater than -1"),
        ({"alpha": -3}, "greater than -1"),
        ({}, "Missing required parameter alpha"),
        ({"alpha": 0.3, "density": [0.0]}, "density must be in"),
    ],
)
def test_bad_parameters_name_the_problem(parameters, message):
    theta0, theta1 = dpo_like_pair(16)
    with pytest.raises(Exception, match=message):
        expo([theta0, theta1], **parameters)


def test_base_model_is_required():
    theta0, theta1 = dpo_like_pair(16)
    group = TensorGroup.from_tensors([theta0, theta1], name="w")
    with pytest.raises(ValueError, match="base"):
        get("expo")((group,), parameters={"alpha": 0.3})


# ------------------------------------------------------------------ output dtype from mergekit's call


def reference_stochastic_bounds(theta0, theta1, alpha, dtype):
    """Each element's two neighbours in `dtype` around the float64 theta2."""
    exact = theta1.double() + alpha * (theta1.double() - theta0.double())
    near = exact.to(dtype).double()
    other = torch.where(near > exact, -torch.inf, torch.inf).to(dtype)
    other = torch.nextafter(near.to(dtype), other).double()
    return exact, torch.minimum(near, other), torch.maximum(near, other)


def kept_along_delta(out, theta0, theta1, alpha):
    delta = theta1.double() - theta0.double()
    return float(((out.double() - theta1.double()) * delta).sum() / (alpha * (delta * delta).sum()))


def test_public_api_takes_out_dtype_from_the_call_whatever_ran_before(family, tmp_path):
    """Stochastic and nearest rounding, several output dtypes, before and after a bf16 run_merge."""
    from conftest import expo_recipe, merge

    theta0, theta1 = dpo_like_pair(1 << 18)
    group = TensorGroup.from_tensors([theta0, theta1], base_index=0, name="w")
    exact64 = theta1.double() + 0.3 * (theta1.double() - theta0.double())

    def call(rounding, out_dtype):
        (out,) = get("expo")((group,), parameters={"alpha": 0.3, "rounding": rounding}, out_dtype=out_dtype)
        return out

    def check_all():
        results = {}
        for dtype in (torch.bfloat16, torch.float16, torch.float32, None):
            nearest = call("nearest", dtype)
            assert nearest.dtype == (dtype or torch.float32)
            if dtype in (torch.bfloat16, torch.float16):
                assert misrounded_share(nearest, exact64) <= 1e-6, dtype
            else:  # float32 math, as in test_merge
                torch.testing.assert_close(nearest.double(), exact64, rtol=3e-7, atol=1e-9)
            stochastic = call("stochastic", dtype)
            assert stochastic.dtype == (dtype or torch.float32)
            if dtype in (torch.bfloat16, torch.float16):
                _, low, high = reference_stochastic_bounds(theta0, theta1, 0.3, dtype)
                assert ((stochastic.double() == low) | (stochastic.double() == high)).all()
                assert kept_along_delta(stochastic, theta0, theta1, 0.3) == pytest.approx(1.0, abs=0.03)
            else:  # float32 holds theta2: nothing to round stochastically
                assert torch.equal(stochastic, nearest)
            results[dtype] = (nearest, stochastic)
        assert kept_along_delta(results[torch.bfloat16][0], theta0, theta1, 0.3) < 0.8
        return results

    before = check_all()
    recipe = expo_recipe(family, alpha=0.3)
    recipe["parameters"]["rounding"] = "stochastic"
    merge(recipe, tmp_path, "bf16")  # a bf16 run_merge in the same process
    after = check_all()
    for dtype, pair in before.items():
        assert all(torch.equal(a, b) for a, b in zip(pair, after[dtype])), dtype


def test_public_api_unknown_parameter_and_non_finite_input():
    from mergekit_expo.method import NonFiniteError

    theta0, theta1 = dpo_like_pair(64)
    with pytest.raises(TypeError, match="Unknown parameter.*alpah"):
        expo([theta0, theta1], alpah=0.3)
    theta1 = theta1.clone()
    theta1[5] = float("nan")
    with pytest.raises(NonFiniteError, match=r"w: 1 NaN or Inf value\(s\) in 1 \(theta1"):
        expo([theta0, theta1], alpha=0.3)
    with pytest.raises(NonFiniteError, match="overflows float16"):
        get("expo")((TensorGroup.from_tensors([theta0, theta0 + 1], base_index=0, name="w"),),
                    parameters={"alpha": 1e6}, out_dtype=torch.float16)
