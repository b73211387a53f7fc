"""Per-layer plot (PNG) for `mergekit-expo inspect --plot`."""

from typing import Dict, Tuple

from mergekit_expo import advice
from mergekit_expo.diagnostics import Report
from mergekit_expo.stats import Change, layer_index, module_kind

KINDS = ("attention", "mlp", "norm")


def by_layer_and_kind(report: Report) -> Dict[Tuple[int, str], Change]:
    groups: Dict[Tuple[int, str], Change] = {}
    for record in report.summary.tensors:
        layer = layer_index(record.name)
        if layer is not None:
            key = (layer, module_kind(record.name))
            groups[key] = groups.get(key, Change()) + record.change
    return groups


def plot_layers(report: Report, path: str) -> None:
    """Normalized ||delta|| per layer and module kind, and the share of alpha * delta
    each output dtype keeps, per layer."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global figure state

    layers = report.summary.layers
    groups = by_layer_and_kind(report)
    figure = Figure(figsize=(8, 7))
    top, bottom = figure.subplots(2, 1, sharex=True)
    top.plot(list(layers), [c.normalized_frobenius for c in layers.values()], "k-", label="all")
    for kind in KINDS:
        points = [(i, groups[(i, kind)].normalized_frobenius) for i in layers if (i, kind) in groups]
        if points:
            top.plot(*zip(*points), marker=".", label=kind)
    top.axhline(advice.SFT_TO_DPO, color="green", linestyle="--", label="SFT->DPO (Table 1)")
    top.axhline(advice.PRETRAINED_TO_SFT, color="red", linestyle="--", label="pretrained->SFT")
    top.set_yscale("log")
    top.set_ylabel("normalized ||theta1 - theta0||")
    top.legend(fontsize="small")
    for dtype in report.dtypes:
        for alpha in report.alphas:
            kept = [c.loss(dtype, alpha).kept for c in layers.values()]
            kept = [float("nan") if k is None else k for k in kept]
            bottom.plot(list(layers), kept, marker=".", label=f"{dtype}, alpha {alpha:g}")
    bottom.axhline(1.0, color="grey", linewidth=0.5)
    bottom.set_ylabel("kept ||stored step|| / ||alpha * delta||")
    bottom.set_xlabel("layer")
    bottom.xaxis.get_major_locator().set_params(integer=True)
    bottom.legend(fontsize="small")
    figure.suptitle(f"{report.aligned} vs {report.sft}", fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
