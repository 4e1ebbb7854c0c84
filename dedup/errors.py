"""Exception hierarchy. Sample-level problems never raise: they become a status in the row."""


class DedupError(Exception):
    """Base class for errors that stop a command (usage, config, unreadable run directory)."""

    exit_code = 1


class ConfigError(DedupError):
    """Invalid configuration, CLI option or embedder spec (exit code 2)."""

    exit_code = 2


class ShardReadError(DedupError):
    """A shard cannot be listed or opened at all (recorded per shard, never fatal to a run)."""


class SchemaMismatchError(DedupError):
    """Features written with a different model, hash size or schema version were mixed."""

    exit_code = 2
