"""The one exception type for user mistakes: the CLI prints it as one line and exits 2."""


class UserError(Exception):
    """A mistake the user can fix (recipe, data, paths, arguments). Never a traceback."""

    exit_code = 2


class NumericalFault(RuntimeError):
    """A non-finite loss, gradient or reward that the recipe does not allow to skip (exit 3)."""

    exit_code = 3
