"""The one exception type a user sees: a one-line message, printed without a traceback, exit code 2."""


class UserError(Exception):
    """Bad input or a bad request from the user. The message names the file, row and field where it can.

    Stage entry points (`rlhfkit.cli.run_stage`) turn it into `error: <message>` on stderr and exit code 2.
    """

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))  # one line, always


def where(path, row=None, field=None) -> str:
    """`file:row: field 'x'` prefix used by every data error, so messages look the same across stages."""
    parts = [str(path)]
    if row is not None:
        parts.append(f"row {row}")
    text = ": ".join(parts)
    if field is not None:
        text += f": field '{field}'"
    return text
