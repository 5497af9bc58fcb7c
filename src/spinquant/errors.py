"""One exception type for every problem the user can fix; the CLI prints its message and exits 2."""


class SpinQuantError(Exception):
    """A problem with the user's input, phrased as: what is wrong, then how to fix it."""
