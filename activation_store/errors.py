"""The project's exception types. Every error a user can cause is one of these, with a message
that says what to do about it."""


class ActivationStoreError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(ActivationStoreError, ValueError):
    """A configuration value or argument is invalid."""


class StoreNotFoundError(ActivationStoreError, FileNotFoundError):
    """No activation store at the given path."""


class StoreExistsError(ActivationStoreError, FileExistsError):
    """Creating a store where one already exists."""


class StoreVersionError(ActivationStoreError):
    """The store was written in a format version this software cannot read."""


class StoreFormatError(ActivationStoreError):
    """The store's metadata is missing or inconsistent."""


class ShardStateError(ActivationStoreError):
    """An input shard is in the wrong state for the requested operation."""


class CapacityError(ActivationStoreError):
    """An input shard received more images than were planned for it."""


class ChunkCorruptError(ActivationStoreError):
    """A stored chunk failed its checksum or could not be decoded."""


class ChunkMissingError(ActivationStoreError):
    """A chunk of a committed input shard is absent from storage."""


class NonFiniteActivationError(ActivationStoreError):
    """Activations handed to a writer hold NaN or inf (or overflow the storage dtype)."""
