"""User-facing errors: one line that names the problem and the fix; the CLI turns them into exit code 2."""


class KVShrinkError(ValueError):
    """Bad input or an unusable model/checkpoint. The message is shown to the user as-is."""
