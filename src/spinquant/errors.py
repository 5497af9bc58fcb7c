"""One exception type for every problem the user can fix; the CLI prints its message and exits 2."""


class SpinQuantError(Exception):
    """A problem with the user's input, phrased as: what is wrong, then how to fix it."""


def unpickling_refusal(error: BaseException) -> str:
    """The useful line of a `torch.load(weights_only=True)` refusal ("unsupported GLOBAL posix.system ...").

    torch's own message goes on to suggest weights_only=False, the one thing not to do with such a file, so
    callers quote this line and say the file was refused instead.
    """
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    why = next((ln for ln in lines if "GLOBAL" in ln or "Unsupported" in ln), lines[0] if lines else "")
    return why[:200] or type(error).__name__
