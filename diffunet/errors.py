"""The toolkit's error classes, in one leaf module every layer raises from (it imports nothing). Each message is
one line that names what is wrong and what to do; the commands print it after ``error:`` and exit with status 2.
Errors of the travelling model code (``model.nn.SizeError``) stay with it, since an exported folder carries
``model/`` alone."""


class ConfigError(ValueError):
    """A config that cannot be used; its message is one line that says what to change."""


class DataError(ValueError):
    """Data that cannot be used; the message is one line naming the source or file and what to do."""


class CheckpointError(RuntimeError):
    """A checkpoint or model folder that cannot be used; the message names it and says why."""


class TrainingError(RuntimeError):
    """A run that had to stop; the message says why and what was kept."""


class PosthocEMAError(ValueError):
    """Post-hoc EMA asked of something that cannot give it; the message is one line that says why."""
