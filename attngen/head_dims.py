"""How the kernels lay out q and k's head dim (its source is also rendered into every kernel module).

A tile's columns span a power of two (``tl.arange``), so a head dim pads up to the next one; where
that wastes much, q and k are split in two power-of-two parts whose products are summed:
MLA's 576 as 512 + 64 (not 1024), its training form's 192 as 128 + 64, 96 as 64 + 32.
"""


def qk_parts(dim: int) -> tuple[int, int]:
    """The padded widths (first, second) of q and k's two column parts for head dim ``dim``; second is 0
    where one part pads the least. Each part is at least 16 wide, tl.dot's smallest depth."""
    whole = max(16, 1 << (dim - 1).bit_length())
    first = whole // 2
    second = max(16, 1 << (dim - first - 1).bit_length()) if dim > first else 0
    return (first, second) if dim > 16 and first + second < whole else (whole, 0)
