"""Every exception type of the package, in one hierarchy. Each error a user can cause, or a state a
user can run into, is one of these, with a message that says what to do about it; the CLI prints
it as one line and exits 2.

    ActivationStoreError
      ConfigError              an argument, flag or config-file value is invalid
      StoreError               the store at a path is absent, foreign, too new or in the wrong state
        StoreNotFoundError, StoreExistsError (StoreNotEmptyError), StoreVersionError,
        StoreFormatError, StoreMismatchError, ShardStateError (ShardClaimedError), CapacityError,
        UnknownLocationError, RowsNotCommittedError, StorageWriteError
      DataError                stored or given data is damaged or unusable
        ChunkCorruptError, ChunkMissingError, ChunkReadError, NonFiniteActivationError, NoDataError
      ModelError               the ViT cannot be built or does not fit the request
        PretrainedUnavailableError
      SourceError              an input source failed (img2dataset stopped, a shard of another rank)
      HarvestError             a stage of the harvest pipeline failed with a foreign error
      CheckpointError          an SAE checkpoint is missing, unreadable or of an unknown format
      DistributedError         processes of one run disagree (weights out of sync, wrong world size)
"""


class ActivationStoreError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(ActivationStoreError, ValueError):
    """A configuration value or argument is invalid."""


# ---------------------------------------------------------------------------- the store
class StoreError(ActivationStoreError):
    """The store is absent, not ours, or in a state that does not allow the operation."""


class StoreNotFoundError(StoreError, FileNotFoundError):
    """No activation store at the given path."""


class StoreExistsError(StoreError, FileExistsError):
    """Creating a store where one already exists."""


class StoreVersionError(StoreError):
    """The store was written in a format version this software cannot read."""


class StoreFormatError(StoreError):
    """The store's metadata is missing or inconsistent."""


class StoreMismatchError(StoreError):
    """Resuming or appending to a store with a different model, weights, preprocessing or layout."""


class ShardStateError(StoreError):
    """An input shard is in the wrong state for the requested operation."""


class CapacityError(StoreError):
    """An input shard received more images than were planned for it."""


class UnknownLocationError(StoreError, KeyError):
    """The store has no such hook location."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class RowsNotCommittedError(StoreError):
    """Rows were asked for that no committed input shard holds."""


# ---------------------------------------------------------------------------- data
class DataError(ActivationStoreError):
    """Stored or given data is damaged or cannot be used."""


class ChunkCorruptError(DataError):
    """A stored chunk failed its checksum or could not be decoded."""


class ChunkMissingError(DataError):
    """A chunk of a committed input shard is absent from storage."""


class ChunkReadError(DataError):
    """Storage kept failing to return an object (a chunk, usually): every attempt of a read,
    retried with back-off, failed (5xx, reset connections, timeouts); the message names it."""


class NonFiniteActivationError(DataError):
    """Activations handed to a writer hold NaN or inf (or overflow the storage dtype)."""


class NoDataError(DataError):
    """The selection holds no tokens (no committed shard, no held-out image, nothing in a split)."""


# ---------------------------------------------------------------------------- harvest
class ModelError(ActivationStoreError):
    """The model cannot be built or does not fit the request (not a ViT, layer out of range, ...)."""


class PretrainedUnavailableError(ModelError):
    """Pretrained weights could not be loaded (offline, missing file, unknown tag)."""


class SourceError(ActivationStoreError):
    """An image source failed: img2dataset stopped, a shard belongs to another rank."""


# ---------------------------------------------------------------------------- SAEs
class CheckpointError(ActivationStoreError):
    """A checkpoint file is missing, unreadable, or not of the expected format."""


class DistributedError(ActivationStoreError):
    """The processes of one run disagree (SAE weights out of sync, a different world size)."""


# ---------------------------------------------------------------------------- the harvest pipeline
class HarvestError(ActivationStoreError):
    """A stage of the harvest (writing to the store, reading or decoding images, the forward pass)
    failed with a foreign error; the message names the stage, the cause's type and message, and
    what to do. The input shard being harvested stays uncommitted: a rerun redoes it."""


# ---------------------------------------------------------------------------- faults of storage and writers
class StoreNotEmptyError(StoreExistsError):
    """Creating a store at a path that holds something that is not an activation store (creating never
    deletes what it did not write)."""


class ShardClaimedError(ShardStateError):
    """Another writer holds the input shard's claim (or took it over from this writer)."""


class StorageWriteError(StoreError):
    """Storage refused a write: no space left, a read-only file system, no permission."""
