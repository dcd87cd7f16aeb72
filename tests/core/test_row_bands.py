"""Decode steps on row buffers in bands of rank columns (``lora_delta_row_bands``): each row multiplies
about its own rank's columns, and the sum is what one product at the batch's largest rank gives."""

from __future__ import annotations

import pytest
import torch

from adapters_core.serving.kernels import lora_delta_row_bands, lora_delta_rows, rank_bands


@pytest.mark.parametrize("row_ranks", [
    [4, 16, 8, 0, 4],  # small bands: row by row
    [16, 4, 16, 16, 16, 16, 16, 8, 0, 16, 16, 4],  # a band of 8 rows: gathered
    [2, 64],
])
@pytest.mark.parametrize("width", [64, 12])  # the layer's capacity may cut the bands short
def test_bands_add_what_one_product_at_the_largest_rank_adds(row_ranks: list[int], width: int) -> None:
    g = torch.Generator().manual_seed(0)
    rows, capacity, in_features, out_features = len(row_ranks), 64, 24, 40
    a_rows = torch.randn(rows + 3, in_features, capacity, generator=g)  # more buffers than rows, as in a server
    b_rows = torch.randn(rows + 3, capacity, out_features, generator=g)
    for i, rank in enumerate(row_ranks):  # past its rank a row's buffers hold zeros
        a_rows[i, :, rank:] = 0
        b_rows[i, rank:] = 0
    x = torch.randn(rows, 1, in_features, generator=g)
    out = torch.randn(rows, 1, out_features, generator=g)
    expected = lora_delta_rows(x, a_rows[:rows, :, :width], b_rows[:rows, :width], out.clone())
    bands = rank_bands(row_ranks, torch.device("cpu"))
    steps = sorted({r for r in row_ranks if r})
    assert [(band.low, band.high) for band in bands] == list(zip([0, *steps[:-1]], steps, strict=True))
    assert bands[0].positions == tuple(range(rows))  # every row, in place (rank-0 rows add zeros)
    for band in bands[1:]:
        assert band.positions == tuple(i for i, r in enumerate(row_ranks) if r >= band.high)
        assert band.rows.tolist() == list(band.positions)
    got = lora_delta_row_bands(x, a_rows, b_rows, bands, width, out)
    assert got is out
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_one_rank_needs_no_bands() -> None:
    assert rank_bands([16, 0, 16, 16], torch.device("cpu")) == ()
    assert rank_bands([0, 0], torch.device("cpu")) == ()
