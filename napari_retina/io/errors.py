"""The one error type for input a user can get wrong: its message is shown as is."""


class RetinaInputError(ValueError):
    """Bad input a user caused (unreadable image, wrong mask size, unwritable folder...).

    The message is one line, names the file, and is what the grader sees
    (napari notification) or what the CLI prints before exiting with code 2.
    """
