"""The lookup every table of choices uses (``nn.DOWNSAMPLE`` ..., ``objectives.TARGETS``, ``tasks.TASKS``,
``fast.PRECISION``): a wrong name fails with one line that lists the valid names."""


def choose(table: dict, name: str, what: str):
    """``table[name]``, or a one-line error that lists the valid names."""
    try:
        return table[name]
    except KeyError:
        raise ValueError(f"unknown {what} {name!r}; choose one of {', '.join(map(repr, table))}") from None
