"""merging/sparsify.py: the kept sets of TIES and Model Breadcrumbs, found by selection, against sorts (the oracle:
mergekit takes them from torch's argsort/sort; above SORT_LIMIT elements loratv's rule is a stable sort's), on
values with many ties; and the L1 rescale against its definition."""

import pytest
import torch

from loratv.merging import sparsify


def _cases(count=150):
    gen = torch.Generator().manual_seed(0)
    for trial in range(count):
        n = int(torch.randint(1, 2500, (1,), generator=gen))
        if trial % 2:
            values = torch.randint(0, 6, (n,), generator=gen).float()  # many ties at every cut
        else:
            values = torch.randn(n, generator=gen).abs()
        low = int(torch.randint(0, n, (1,), generator=gen))
        yield values, low, int(torch.randint(0, n - low + 1, (1,), generator=gen))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_windows_are_the_sorts(dtype, monkeypatch):
    for values, low, count in _cases():
        values = values.to(dtype)
        n = values.numel()
        # mergekit's own calls (tensors up to SORT_LIMIT)
        kept, _ = sparsify.rank_window(values, low, count)
        want = torch.zeros(n, dtype=torch.bool)
        want[torch.sort(values).indices[low:low + count]] = True
        assert torch.equal(kept, want) and int(kept.sum()) == count
        if count:
            kept, _ = sparsify.rank_window(values, n - count, count, top_k=True)
            want = torch.zeros(n, dtype=torch.bool)
            want[torch.argsort(values, descending=True)[:count]] = True
            assert torch.equal(kept, want)
    monkeypatch.setattr(sparsify, "SORT_LIMIT", 0)  # above it: a stable sort's choice, found without sorting
    for values, low, count in _cases():
        values = values.to(dtype)
        n = values.numel()
        kept, tied = sparsify.rank_window(values, low, count)
        want = torch.zeros(n, dtype=torch.bool)
        want[torch.sort(values, stable=True).indices[low:low + count]] = True
        assert torch.equal(kept, want)
        if count:
            kept, _ = sparsify.rank_window(values, n - count, count, top_k=True)
            want = torch.zeros(n, dtype=torch.bool)
            want[torch.sort(values, descending=True, stable=True).indices[:count]] = True
            assert torch.equal(kept, want)


def test_tied_marks_exactly_the_values_at_a_straddled_cut():
    values = torch.tensor([5.0, 1.0, 3.0, 3.0, 3.0, 0.5, 7.0, 3.0])
    kept, tied = sparsify.rank_window(values, 8 - 4, 4, top_k=True)  # 7, 5 and two of the four 3s
    assert int(kept.sum()) == 4 and kept[0] and kept[6]
    assert torch.equal(tied, values == 3.0)
    _, tied = sparsify.rank_window(torch.tensor([1.0, 2.0, 3.0, 4.0]), 1, 2)
    assert tied is None


def test_trim_of_magnitude_with_rescale_is_the_definition():
    gen = torch.Generator().manual_seed(1)
    delta = torch.randn(64, 48, generator=gen)
    trim = sparsify.trim_of(delta.abs(), "magnitude", 0.3, rescale=True)
    k = max(1, int(0.3 * delta.numel()))
    assert int(trim.mask.sum()) == k
    assert delta.abs()[trim.mask].min() >= delta.abs()[~trim.mask].max()
    want = delta.abs().sum() / (delta.abs() * trim.mask).sum()
    assert torch.equal(trim.factor, want)
    assert torch.equal(trim.apply(delta), delta * trim.mask.float() * want)
    assert sparsify.trim_of(delta.abs(), "magnitude", 1.0) is None
