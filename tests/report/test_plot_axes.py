"""What a reader can see in the plots: tick labels that span the data, legends that cover nothing they name.

The figures are built from small synthetic records (the same fields compare and analyze write) and drawn, so the
checks run on the laid-out figure in display coordinates, not on the record.
"""

import matplotlib
import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg

from loratv.report import analysis_plots, plots


def _shared(gaps):
    kinds = ["self_attn.q_proj.weight", "self_attn.k_proj.weight"]
    return {"tensors": [{"category": "shared", "cosine": 1.0 - g, "kind": kinds[i % 2]} for i, g in enumerate(gaps)]}


def _visible_ticks(ax, axis):
    """(tick values inside the view, their label texts) after drawing."""
    target = ax.xaxis if axis == "x" else ax.yaxis
    lo, hi = ax.get_xlim() if axis == "x" else ax.get_ylim()
    ticks = [(t.get_loc(), t.label1.get_text()) for t in target.get_major_ticks()
             if lo <= t.get_loc() <= hi and t.label1.get_visible()]
    return [v for v, _ in ticks], [s for _, s in ticks]


@pytest.mark.parametrize("gaps", [
    np.linspace(6.9e-7, 1.5e-6, 120),  # the fp16 validation: one decade boundary, data on both sides of it
    np.linspace(1.2e-14, 2.2e-14, 120),  # fp32: within one decade
    np.concatenate([[0.0, 0.0], np.geomspace(1e-12, 3e-5, 50)]),  # exact zeros drawn at the floor, many decades
    np.full(5, 2.5e-7),  # one value
])
def test_cosine_axes_label_the_whole_data_range(gaps):
    shown = np.maximum(gaps, plots.FLOOR)
    with matplotlib.rc_context(plots.STYLE):
        fig, info = plots._cosine_figure(_shared(gaps))
        try:
            FigureCanvasAgg(fig).draw()  # plots are made without pyplot: attach a canvas to lay them out
            left, right = fig.axes[:2]
            for ax, axis in ((left, "y"), (right, "x")):
                values, labels = _visible_ticks(ax, axis)
                assert all(labels), labels  # every tick inside the view has a label
                assert len(values) >= 2
                assert min(values) <= shown.min() * (1 + 1e-9), (axis, values, shown.min())
                assert max(values) >= shown.max() * (1 - 1e-9), (axis, values, shown.max())
                lo, hi = ax.get_ylim() if axis == "y" else ax.get_xlim()
                assert lo <= shown.min() and hi >= shown.max()
            # the histogram counts every value, the extremes included
            assert sum(p.get_height() for p in right.patches) == len(gaps)
        finally:
            fig.clear()
    assert info["ticks"][0] <= shown.min() and info["ticks"][-1] >= shown.max()


def _spectral_record(n_layers=4, r=8, k=24):
    tensors = []
    for kind in ("self_attn.q_proj.weight", "self_attn.k_proj.weight"):
        for layer in range(n_layers):
            # the fp16 shape: above the floor up to r, then noise just below it, out to the right edge
            s = np.concatenate([np.geomspace(3e5, 1e5, r), np.geomspace(0.9, 0.5, k - r)])
            tensors.append({"kind": kind, "layer": layer, "spectrum": {"singular_values": s.tolist(),
                                                                        "noise_floor": 1.0, "adapter_rank": r}})
    return {"tensors": tensors, "spectrum": True}


def test_spectra_legend_covers_no_line_it_names():
    with matplotlib.rc_context(plots.STYLE):
        fig, info = analysis_plots._spectra_figure(_spectral_record())
        try:
            FigureCanvasAgg(fig).draw()  # plots are made without pyplot: attach a canvas to lay them out
            renderer = fig.canvas.get_renderer()
            legend = info["legend"]
            assert legend is not None
            labels = [t.get_text() for t in legend.get_texts()]
            assert "rounding-noise floor φ" in labels and "adapter rank r = 8" in labels
            box = legend.get_window_extent(renderer)
            for ax in fig.axes:
                assert ax.get_legend() is None
                assert not box.overlaps(ax.get_window_extent(renderer)), "the legend lies over a panel"
                for line in ax.get_lines():  # the floor, the rank marker and every spectrum, in display space
                    xy = line.get_transform().transform(np.column_stack(line.get_data()))
                    inside = ((xy[:, 0] >= box.x0) & (xy[:, 0] <= box.x1) & (xy[:, 1] >= box.y0) & (xy[:, 1] <= box.y1))
                    assert not inside.any(), line.get_label()
        finally:
            fig.clear()


def test_log_ticks_cover_their_bounds():
    for lo, hi in [(6.946e-7, 1.396e-6), (1e-17, 1e-6), (3e-3, 0.5), (1.0, 1.0), (2e-30, 7e5)]:
        ticks = plots.log_ticks_covering(lo, hi)
        assert ticks[0] <= lo and ticks[-1] >= hi and ticks == sorted(ticks), (lo, hi, ticks)
        assert len(ticks) <= plots.LOG_TICKS
