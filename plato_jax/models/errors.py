"""The error every checkpoint reader raises."""


class CheckpointError(ValueError):
  """A checkpoint that cannot be loaded; the message names the file, tensor or field."""
