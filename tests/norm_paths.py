"""Knobs that steer group_norm's Triton kernels onto a given path on the small tensors of the tests."""
from mdm_fast.kernels import group_norm as kern


def small_tiles(monkeypatch, tile: int) -> None:
    """Tiles of ``tile`` elements in every kernel of the norm."""
    for name in ("TILE_FWD", "TILE_BWD", "SINGLE_TILE"):
        monkeypatch.setattr(kern, name, tile)


def force_whole_rows(monkeypatch, tile: int, max_split: int) -> None:
    """Every channels_last norm on the split path over whole rows (the large norms of the public models),
    in up to ``max_split`` parts per sample of tiles of ``tile`` elements."""
    small_tiles(monkeypatch, tile)
    monkeypatch.setattr(kern, "NHWC_WHOLE_ROWS_ELEMENTS", 0)
    monkeypatch.setattr(kern, "_whole_rows_pay", lambda *a: True)
    monkeypatch.setattr(kern, "WHOLE_ROWS_MIN_ROWS", 1)
    monkeypatch.setattr(kern, "MAX_SPLIT", max_split)
