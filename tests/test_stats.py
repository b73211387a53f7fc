"""Weight-change statistics and rounding loss against float64 and constructed cases."""

import math

import pytest
import torch
from conftest import expo_recipe, load, merge, nearest

from mergekit_expo import stats
from mergekit_expo.rounding import stochastic_round_, tensor_seed
from mergekit_expo.tiny import build_family

BF16_ULP_AT_ONE = 2.0**-7  # bf16 spacing in [1, 2)
FP16_ULP_AT_ONE = 2.0**-10


def one_ulp_pair(n=1 << 16, seed=0):
    """bf16 theta0 with |values| in [1, 1.9]; theta1 = theta0 moved 1 bf16 ulp away from 0."""
    g = torch.Generator().manual_seed(seed)
    magnitude = 1 + 0.9 * torch.rand(n, generator=g)
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    theta0 = (sign * magnitude).to(torch.bfloat16)
    theta1 = (theta0.float() + sign * BF16_ULP_AT_ONE).to(torch.bfloat16)
    return theta0, theta1


@pytest.mark.parametrize(
    "alpha, dtype, back, kept",
    [
        (0.3, "bfloat16", 1.0, 0.0),  # 0.3 ulp rounds back
        (0.6, "bfloat16", 0.0, 1 / 0.6),  # 0.6 ulp rounds to a whole ulp
        (0.3, "float16", 0.0, 2 / 2.4),  # 0.3 bf16 ulp = 2.4 fp16 ulps -> 2
        (0.6, "float16", 0.0, 5 / 4.8),  # 4.8 fp16 ulps -> 5
        (0.3, "float32", 0.0, 1.0),  # up to float32's own rounding of 0.3 ulp
    ],
)
def test_rounding_loss_of_one_ulp_deltas(alpha, dtype, back, kept):
    theta0, theta1 = one_ulp_pair()
    assert ((theta1.double() - theta0.double()).abs() == BF16_ULP_AT_ONE).all()
    loss = stats.measure(theta0, theta1, [alpha], [dtype]).loss(dtype, alpha)
    assert loss.moved == 1 << 16
    assert loss.rounded_back_fraction == back
    assert loss.kept == pytest.approx(kept, rel=1e-4, abs=1e-12)
    assert loss.kept_along_delta == pytest.approx(kept, rel=1e-4, abs=1e-12)


def test_rounded_back_counts_only_changed_elements():
    theta0, theta1 = one_ulp_pair()
    theta1[::2] = theta0[::2]
    change = stats.measure(theta0, theta1, [0.3, 0.6], ["bfloat16"])
    assert change.changed == 1 << 15
    assert change.loss("bfloat16", 0.3).rounded_back == 1 << 15
    assert change.loss("bfloat16", 0.6).rounded_back == 0
    assert change.loss("bfloat16").moved == 1 << 16  # summed over both alphas


def float64_reference(theta0, theta1, alpha, dtype):
    t0, t1 = theta0.double(), theta1.double()
    delta = t1 - t0
    stored1 = nearest(t1, dtype)
    step = nearest(t1 + alpha * delta, dtype) - stored1
    changed = delta != 0
    cosine = (t0 * t1).sum() / (t0.norm() * t1.norm())
    return {
        "numel": t0.numel(),
        "changed": int(changed.sum()),
        "delta_sq": float((delta * delta).sum()),
        "theta0_sq": float((t0 * t0).sum()),
        "one_minus_cosine": float(1 - cosine),
        "rounded_back": int((changed & (step == 0)).sum()),
        "kept_sq": float((step * step).sum()),
        "kept_dot": float(alpha * (step * delta).sum()),
    }


@pytest.fixture(scope="module")
def dpo_sized(tmp_path_factory):
    """bf16 tiny family with a DPO-sized change: normalized norm 6.2e-6 (Table 1: 6.348e-6)."""
    root = tmp_path_factory.mktemp("dpo_sized")
    return build_family(str(root), aligned=("dpo",), scale=0.0005)


def test_statistics_match_float64_on_tiny_models(dpo_sized):
    theta0s, theta1s = load_pair(dpo_sized)
    records = []
    for name, theta0 in theta0s.items():
        change = stats.measure(theta0, theta1s[name], [0.3], ["bfloat16", "float16"])
        records.append(stats.TensorRecord(name, tuple(theta0.shape), None, change))
        for dtype in (torch.bfloat16, torch.float16):
            ref = float64_reference(theta0, theta1s[name], 0.3, dtype)
            loss = change.loss(str(dtype).removeprefix("torch."), 0.3)
            assert (change.numel, change.changed) == (ref["numel"], ref["changed"])
            assert change.delta_sq == pytest.approx(ref["delta_sq"], rel=1e-5)
            assert change.theta0_sq == pytest.approx(ref["theta0_sq"], rel=1e-5)
            assert abs(loss.rounded_back - ref["rounded_back"]) <= 1e-4 * ref["numel"]
            assert loss.kept_sq == pytest.approx(ref["kept_sq"], rel=1e-3)
            assert loss.kept_dot == pytest.approx(ref["kept_dot"], rel=1e-3)
            if name.endswith("proj.weight"):
                assert change.one_minus_cosine == pytest.approx(ref["one_minus_cosine"], rel=1e-3)

    total = stats.summarize(records).total
    t0 = torch.cat([t.double().flatten() for t in theta0s.values()])
    t1 = torch.cat([theta1s[k].double().flatten() for k in theta0s])
    delta = t1 - t0
    assert total.frobenius == pytest.approx(float(delta.norm()), rel=1e-5)
    assert total.normalized_frobenius == pytest.approx(float(delta.square().mean().sqrt()), rel=1e-5)
    assert total.relative == pytest.approx(float(delta.norm() / t0.norm()), rel=1e-5)
    cosine = float((t0 * t1).sum() / (t0.norm() * t1.norm()))
    assert total.cosine == pytest.approx(cosine, abs=1e-12)
    assert total.changed_fraction == pytest.approx(float((delta != 0).double().mean()))


def load_pair(family):
    from safetensors.torch import load_file

    return (load_file(f"{family[k]}/model.safetensors") for k in ("sft", "dpo"))


def test_aggregates_by_module_kind_and_layer(dpo_sized):
    theta0s, theta1s = load_pair(dpo_sized)
    records = [
        stats.TensorRecord(n, tuple(t.shape), None, stats.measure(t, theta1s[n], [0.3], ["float32"]))
        for n, t in theta0s.items()
    ]
    summary = stats.summarize(records)
    assert set(summary.kinds) == {"embeddings", "attention", "mlp", "norm", "lm_head"}
    assert list(summary.layers) == [0, 1]
    layer = sum(
        (r.change for r in records if r.name.startswith("model.layers.1.")), stats.Change()
    )
    assert summary.layers[1].delta_sq == layer.delta_sq
    assert summary.kinds["mlp"].tensors == 6
    assert sum(c.numel for c in summary.kinds.values()) == summary.total.numel


def test_module_kind_and_layer_of_names():
    assert stats.module_kind("model.layers.3.self_attn.q_proj.weight") == "attention"
    assert stats.layer_index("model.layers.3.self_attn.q_proj.weight") == 3
    assert stats.layer_index("transformer.h.11.mlp.c_fc.weight") == 11
    assert stats.layer_index("model.embed_tokens.weight") is None


# ------------------------------------------------------------------ stochastic rounding


def test_stochastic_rounding_is_unbiased_on_a_large_tensor():
    theta0, theta1 = one_ulp_pair(n=1 << 22)
    t1, delta = theta1.float(), theta1.float() - theta0.float()
    exact = t1 + 0.3 * delta
    rounded = stochastic_round_(exact.clone(), torch.bfloat16, seed=1)
    assert torch.equal(rounded.to(torch.bfloat16).float(), rounded)  # on the bf16 grid
    assert set(((rounded - t1) / delta).unique().tolist()) == {0.0, 1.0}
    share_up = float(((rounded - t1) / delta).double().mean())
    sigma = math.sqrt(0.3 * 0.7 / (1 << 22))
    assert abs(share_up - 0.3) < 5 * sigma
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1 << 22, generator=g) * 0.02
    error = stochastic_round_(x.clone(), torch.float16, seed=3).double() - x.double()
    assert abs(float(error.mean())) < 5 * float(error.std()) / 2**11


def test_stochastic_rounding_is_reproducible_per_seed():
    x = torch.randn(1 << 18) * 0.02
    a, b, c = (stochastic_round_(x.clone(), torch.bfloat16, seed) for seed in (7, 7, 8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert tensor_seed(0, "w") == tensor_seed(0, "w") != tensor_seed(0, "v")


def test_stochastic_rounding_keeps_extremes_finite_and_specials():
    x = torch.tensor([float("inf"), float("nan"), -float("inf"), 3.39e38, -3.39e38, 7e4, -7e4, 0.0])
    bf16 = stochastic_round_(x.clone(), torch.bfloat16, 0)
    fp16 = stochastic_round_(x.clone(), torch.float16, 0)
    assert bf16[0] == math.inf and bf16[1].isnan() and bf16[2] == -math.inf
    assert bf16[3:].isfinite().all() and fp16[3:].isfinite().all()
    assert fp16[5] == 65504 and fp16[6] == -65504


def effective_alpha(family, out):
    theta0s, theta1s = load_pair(family)
    num = den = 0.0
    for name, t0 in theta0s.items():
        t1 = theta1s[name].double()
        delta = t1 - t0.double()
        num += float(((out[name].double() - t1) * delta).sum())
        den += float((delta * delta).sum())
    return num / den


def test_stochastic_merge_keeps_alpha_in_expectation(dpo_sized, tmp_path):
    recipe = expo_recipe(dpo_sized, alpha=0.3)
    with stats.observing() as nearest:
        nearest_alpha = effective_alpha(dpo_sized, load(merge(recipe, tmp_path, "nearest")))
    nearest_kept = nearest.summary().total.loss("bfloat16").kept_along_delta
    recipe["parameters"].update(rounding="stochastic", rounding_seed=5)
    with stats.observing() as stochastic:
        out = merge(recipe, tmp_path, "stochastic")
    kept = stochastic.summary().total.loss("bfloat16").kept_along_delta
    assert effective_alpha(dpo_sized, load(out)) == pytest.approx(0.3, rel=0.05)
    assert kept == pytest.approx(1.0, abs=0.05)
    assert nearest_alpha < 0.25 and nearest_kept < 0.8  # what round-to-nearest loses
    again = merge(recipe, tmp_path, "again")
    assert all(torch.equal(a, load(again)[k]) for k, a in load(out).items())
    recipe["parameters"]["rounding_seed"] = 6
    other = load(merge(recipe, tmp_path, "other"))
    assert any(not torch.equal(a, other[k]) for k, a in load(out).items())


def test_stochastic_kernel_output_is_on_the_grid_whatever_the_order():
    from mergekit.merge_methods import TensorGroup, get

    g = torch.Generator().manual_seed(0)
    tensors = {n: (torch.randn(4096, generator=g) * 0.02).to(torch.bfloat16) for n in "ab"}
    aligned = {n: (t.float() + torch.randn(4096, generator=g) * 3e-5).to(torch.bfloat16) for n, t in tensors.items()}

    def run(order):
        results = {}
        for name in order:
            group = TensorGroup.from_tensors([tensors[name], aligned[name]], base_index=0, name=name)
            (results[name],) = get("expo")(
                (group,), parameters={"alpha": 0.3, "rounding": "stochastic"}, out_dtype=torch.bfloat16
            )
        return results

    first, second = run("ab"), run("ba")
    for name, result in first.items():
        assert result.dtype == torch.bfloat16
        assert torch.equal(result, second[name])


def test_observers_see_only_their_run_and_never_change_results():
    from mergekit.merge_methods import TensorGroup, get

    theta0, theta1 = one_ulp_pair(1 << 12)
    group = TensorGroup.from_tensors([theta0, theta1], base_index=0, name="w")
    call = lambda: get("expo")((group,), parameters={"alpha": 0.3}, out_dtype=torch.bfloat16)[0]
    unobserved = call()
    with stats.observing() as first:
        observed = call()
        with stats.observing() as second:
            call()
    call()
    assert torch.equal(unobserved, observed)
    assert [r.name for r in first.records()] == ["w", "w"]
    assert [r.name for r in second.records()] == ["w"]
    assert first.records()[0].change.dtypes == ["bfloat16"]


# ------------------------------------------------------------------ inside the merge


def test_merge_logs_rounding_loss_and_card_has_the_table(dpo_sized, tmp_path, caplog):
    with caplog.at_level("INFO", logger="mergekit_expo"):
        out = merge(expo_recipe(dpo_sized, alpha=0.3), tmp_path)
    assert "written as bfloat16" in caplog.text
    assert "of alpha * delta" in caplog.text and "rounding: stochastic" in caplog.text
    assert "collapse" not in caplog.text
    card = (out / "README.md").read_text()
    assert "### Weight change theta1 - theta0, and what bfloat16 keeps of alpha * delta" in card
    assert "| **all** | 21 |" in card and "| attention | 8 |" in card
