"""The lookup every table of choices uses (``nn.DOWNSAMPLE`` ..., ``objectives.TARGETS``, ``tasks.TASKS``,
``training.precision.PRECISION``): a wrong name fails with one line that lists the valid names."""


def choose(table: dict, name: str, what: str):
    """``table[name]``, or a one-line error that lists the valid names."""
    try:
        return table[name]
    except KeyError:
        raise ValueError(f"unknown {what} {name!r}; choose one of {', '.join(map(repr, table))}") from None


def as_size(size) -> tuple[int, int]:
    """(H, W) from an int, a pair, or a config list."""
    if isinstance(size, int):
        return (size, size)
    h, w = size
    return (int(h), int(w))
