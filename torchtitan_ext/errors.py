"""Error types shared across the package; a leaf module that imports nothing of torchtitan_ext,
so any layer (config, the features, the runtime, the tools) can raise or catch them without
importing the config package."""


class ConfigError(ValueError):
    """A recipe or CLI value that cannot be trained with.

    ``str(err)`` is one line: ``<key> = <value>: <reason>``, the form every rank prints
    before exiting (see ``torchtitan_ext.trainer.main``).

    Attributes:
        key: the dotted recipe key, e.g. ``"training.seq_len"`` (or a file's role, e.g.
            ``"job.config_file"``).
        value: the offending value as given.
        reason: why it cannot be trained with, one line.
    """

    def __init__(self, key: str, value: object, reason: str) -> None:
        self.key = key
        self.value = value
        self.reason = reason
        super().__init__(f"{key} = {value!r}: {reason}")
