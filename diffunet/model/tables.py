"""The lookup every table of choices uses (``nn.DOWNSAMPLE`` ..., ``objectives.TARGETS``, ``tasks.TASKS``,
``training.precision.PRECISION``): a wrong name fails with one line that lists the valid names."""


def choose(table: dict, name: str, what: str):
    """``table[name]``, or a one-line error that lists the valid names."""
    try:
        return table[name]
    except KeyError:
        raise ValueError(f"unknown {what} {name!r}; choose one of {', '.join(map(repr, table))}") from None


def as_size(size, dims: int = 2) -> tuple[int, ...]:
    """One size per axis from an int (every axis) or a sequence of ``dims`` ints: (H, W) for an image."""
    if isinstance(size, int):
        return (size,) * dims
    sizes = tuple(int(n) for n in size)
    if len(sizes) != dims:
        raise ValueError(f"size {list(sizes)} has {len(sizes)} axes where {dims} are needed; give one int or {dims}")
    return sizes
