"""The one exception type that means "the user asked for something wrong".

The CLI prints a ``UserError`` as a single line and exits with status 2, before any
compilation; everything else is a bug and keeps its traceback.
"""


class UserError(ValueError):
    """A mistake in the user's config, flags or files, phrased in their words."""
