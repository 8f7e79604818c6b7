"""PNG plots of an analysis record (schema `loratv.analysis`): the T-against-ΔW scatter, value distributions, the
residual in ulps, spectra against the noise floor, and the per-layer numerical rank. Each reads the record alone and
returns a small dict of what it drew, for tests."""

import math
from pathlib import Path

import numpy as np

from loratv.report.plots import CYCLE, MARKERS, _empty, _grid, _grid_size, _label_ticks, _render, colormap, subplots

FILES = {"scatter": "analysis_scatter.png", "distributions": "analysis_distributions.png",
         "ulps": "analysis_residual_ulps.png", "spectra": "spectra.png", "ranks": "rank_heatmap.png"}
LABELS = {"delta": "ΔW (LoRA delta)", "task_vector": "T (task vector)", "residual": "R = T − ΔW (residual)"}
MAX_PANELS = 16  # spectra panels (module kinds); the rest are named in the title


def bin_label(lo, hi) -> str:
    """A histogram bin as text; the open last bin's edge is inf (None once written to JSON).

    Args:
        lo: the bin's lower edge.
        hi: its upper edge; inf or None for the open last bin.

    Returns:
        "[lo, hi)", or "≥ lo" for the open bin.
    """
    return f"[{lo:g}, {hi:g})" if hi is not None and math.isfinite(hi) else f"≥ {lo:g}"


def _kind_style(k: int) -> dict:
    return {"color": CYCLE[k % len(CYCLE)], "marker": MARKERS[(k // len(CYCLE)) % len(MARKERS)]}


def _scatter_figure(record):
    groups = {}
    for s in record["scatter"]:
        g = groups.setdefault(s["kind"], ([], []))
        g[0].extend(s["delta"])
        g[1].extend(s["task_vector"])
    fig, (left, right) = subplots(1, 2, figsize=(13, 5.5))
    points = 0
    for k, (kind, (d, t)) in enumerate(groups.items()):
        d, t = np.asarray(d), np.asarray(t)
        style = _kind_style(k)
        left.scatter(d, t, s=4, alpha=0.5, label=kind, **style)
        right.scatter(d, t - d, s=4, alpha=0.5, **style)
        points += d.size
    if points:
        values = np.concatenate([np.r_[d, t] for d, t in groups.values()])
        lim = float(np.abs(values).max()) or 1.0
        left.plot([-lim, lim], [-lim, lim], color="#000000", linewidth=0.8, linestyle="--", label="y = x")
        left.legend(title="module kind", loc="upper left", bbox_to_anchor=(0, -0.14), ncol=min(4, len(groups)),
                    fontsize=7, frameon=False, markerscale=3)
        right.axhline(0, color="#000000", linewidth=0.8, linestyle="--")
        right.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    else:
        _empty(left, "no changed tensors")
        _empty(right, "no changed tensors")
    left.set(xlabel="ΔW element (weight units)", ylabel="T element (weight units)",
             title=f"Task vector against LoRA delta ({points:,} sampled elements)")
    right.set(xlabel="ΔW element (weight units)", ylabel="T − ΔW (weight units)", title="Residual against LoRA delta")
    fig.tight_layout()
    return fig, {"points": points, "kinds": list(groups)}


def _distribution_figure(record):
    kinds = record["kinds"]
    fig, axes = subplots(1, 3, figsize=(15, 4.8))
    drawn = {}
    for ax, q in zip(axes, ("delta", "task_vector", "residual")):
        rows = [(kind, k[q]) for kind, k in kinds.items() if k[q]["count"] and k[q]["std"] > 0]
        for k, (kind, stats) in enumerate(rows):
            qs = stats["quantiles_sampled"]
            lo, hi = qs["0.001"], qs["0.999"]
            if lo is None or hi is None or lo == hi:
                continue
            # the empirical CDF at its quantiles on a logit axis: both tails stay visible, decades apart
            cdf = [(float(p), v) for p, v in qs.items() if v is not None]
            ax.plot([v for _, v in cdf], [p for p, _ in cdf], marker="o", markersize=3, linewidth=1,
                    color=CYCLE[k % len(CYCLE)], label=f"{kind} (skew {stats['skewness']:.2g}, "
                    f"ex. kurt. {stats['excess_kurtosis']:.2g})")
        drawn[q] = len(rows)
        ax.set_yscale("logit")
        ax.set(xlabel=f"{LABELS[q]} value (weight units)", ylabel="cumulative probability (logit scale)",
               title=f"Quantiles of {LABELS[q]}")
        if rows:
            ax.legend(fontsize=6, frameon=False, loc="upper left", bbox_to_anchor=(0, -0.16))
            ax.ticklabel_format(axis="x", style="sci", scilimits=(-2, 2))
        else:
            _empty(ax, "all zero")
    fig.tight_layout()
    return fig, drawn


def _ulp_figure(record):
    hist = record["summary"]["residual_ulp_histogram"]
    fig, ax = subplots(figsize=(9, 4.8))
    if hist is None:
        _empty(ax, "no base model given: ulps need the stored weights")
        ax.set(title="Residual in ulps of the stored weight")
        return fig, {"bars": 0}
    edges, counts = hist["edges"], hist["counts"]
    labels = [bin_label(lo, hi) for lo, hi in zip(edges, edges[1:])]
    x = np.arange(len(counts))
    bars = ax.bar(x, counts, color="#009E73", width=0.7)
    total = sum(counts) or 1
    ax.bar_label(bars, labels=[f"{c:,}\n({100 * c / total:.2g}%)" if c else "0" for c in counts], fontsize=7, padding=2)
    ax.set_yscale("symlog", linthresh=1)
    ax.set_xticks(x, labels)
    ax.set(xlabel="|T − ΔW| in ulps of the stored weight (bins)", ylabel="elements (count, symlog scale)",
           title=f"Residual in units in the last place ({total:,} elements; max {record['summary']['max_residual_ulps']:.3g})")
    fig.tight_layout()
    return fig, {"bars": len(counts), "total": total}


def _spectra_figure(record):
    rows = [t for t in record["tensors"] if t.get("spectrum")]
    kinds = list(dict.fromkeys(t["kind"] for t in rows))
    shown = kinds[:MAX_PANELS]
    cols = min(4, max(1, len(shown)))
    nrows = max(1, math.ceil(len(shown) / cols))
    fig, axes = subplots(nrows, cols, figsize=(4.2 * cols, 3.4 * nrows), squeeze=False)
    layers = [t["layer"] for t in rows if t["layer"] is not None]
    top = max(layers, default=0) or 1
    cmap = colormap("viridis")
    lines = 0
    for ax, kind in zip(axes.flat, shown):
        members = [t for t in rows if t["kind"] == kind]
        floors = [t["spectrum"]["noise_floor"] for t in members]
        relative = all(f is not None and f > 0 for f in floors)
        for t in members:
            s = np.asarray(t["spectrum"]["singular_values"])
            scale = t["spectrum"]["noise_floor"] if relative else (s[0] or 1.0)
            colour = cmap((t["layer"] or 0) / top)
            ax.semilogy(np.arange(1, s.size + 1), np.maximum(s / scale, 1e-12), color=colour, linewidth=0.9, alpha=0.8)
            lines += 1
        ranks = {t["spectrum"]["adapter_rank"] for t in members if t["spectrum"]["adapter_rank"]}
        for r in sorted(ranks):
            ax.axvline(r + 0.5, color="#D55E00", linestyle="--", linewidth=1, label=f"adapter rank r = {r}")
        if relative:
            ax.axhline(1.0, color="#000000", linestyle=":", linewidth=1, label="rounding-noise floor φ")
        ax.set(title=kind, xlabel="index i", ylabel="σ_i(T) / φ (log)" if relative else "σ_i(T) / σ_1 (log)")
    for ax in list(axes.flat)[len(shown):]:
        ax.axis("off")
    if not rows:
        _empty(axes.flat[0], "no spectra (run analyze --spectrum)")
    more = f" (first {MAX_PANELS} of {len(kinds)} kinds)" if len(kinds) > MAX_PANELS else ""
    fig.suptitle(f"Leading singular values of the task vector per tensor, coloured by layer (viridis: first → last){more}")
    # one legend for the figure, below the panels: inside an axes it covered the floor line or the spectra it names
    handles = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    legend = None
    if handles:
        legend = fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=len(handles),
                            fontsize=8, frameon=False, bbox_to_anchor=(0.5, 0.0))
    fig.tight_layout(rect=(0, 0.35 / fig.get_figheight() if handles else 0, 1, 1))
    return fig, {"panels": len(shown), "lines": lines, "legend": legend}


def _rank_figure(record):
    rows = [t for t in record["tensors"] if t.get("spectrum") and t["spectrum"]["numerical_rank"] is not None]
    layered, layers, kinds = _grid(rows)
    values = np.full((len(layers), len(kinds)), np.nan)
    row = {layer: i for i, layer in enumerate(layers)}
    col = {kind: j for j, kind in enumerate(kinds)}
    for t in layered:
        values[row[t["layer"]], col[t["kind"]]] = t["spectrum"]["numerical_rank"]
    fig, ax = subplots(figsize=_grid_size(len(layers), len(kinds)))
    masked = np.ma.masked_invalid(values)
    if masked.count():
        cmap = colormap("cividis").with_extremes(bad="white")
        mesh = ax.pcolormesh(masked, cmap=cmap, vmin=0, vmax=max(1.0, float(masked.max())), edgecolors="white",
                             linewidth=0.4)
        fig.colorbar(mesh, ax=ax, label="numerical rank of T above the noise floor (blank: no spectrum)")
        if values.size <= 800:  # numbers in the cells while they still fit
            for (i, j), v in np.ndenumerate(values):
                if not np.isnan(v):
                    lower = any(t["spectrum"]["numerical_rank_is_lower_bound"] for t in layered
                                if row[t["layer"]] == i and col[t["kind"]] == j)
                    ax.text(j + 0.5, i + 0.5, f"≥{int(v)}" if lower else str(int(v)), ha="center", va="center",
                            fontsize=6, color="white" if v < 0.5 * float(masked.max()) else "black")
        ax.set_xlim(0, len(kinds))
        ax.set_ylim(len(layers), 0)
        _label_ticks(ax, "x", kinds)
        _label_ticks(ax, "y", [str(layer) for layer in layers])
    else:
        _empty(ax, "no per-layer spectra with a noise floor")
    ax.set(xlabel="module kind (name without layer prefix)", ylabel="layer",
           title="Numerical rank of each task-vector tensor")
    return fig, {"shape": values.shape, "values": [[None if np.isnan(v) else int(v) for v in r] for r in values]}


def write_analysis_plots(record: dict, out_dir) -> list[Path]:
    """Write the analysis record's PNG plots: scatter, distributions and residual ulps, plus spectra and the rank
    heatmap when the record has a spectrum.

    Args:
        record: the `loratv.analysis` record.
        out_dir: the folder to write into (created if missing); file names are FILES' values.

    Returns:
        The paths written, in that order.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    builders = {"scatter": _scatter_figure, "distributions": _distribution_figure, "ulps": _ulp_figure}
    if record.get("spectrum"):
        builders.update({"spectra": _spectra_figure, "ranks": _rank_figure})
    written = []
    for key, build in builders.items():
        _render(build, record, out_dir / FILES[key])
        written.append(out_dir / FILES[key])
    return written
