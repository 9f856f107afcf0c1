"""Progress reporting shared by the CLI (tqdm) and the pages (st.progress).

Long-running core functions take ``progress: ProgressCallback | None`` and call
it with a fraction in [0, 1] and a short description of the current step.
"""

from typing import Callable, Optional

from tqdm.auto import tqdm

ProgressCallback = Callable[[float, str], None]


def report(progress: Optional[ProgressCallback], fraction: float, message: str = "") -> None:
    if progress is not None:
        progress(min(max(float(fraction), 0.0), 1.0), message)


def tqdm_progress(desc: str = "") -> ProgressCallback:
    """A callback that drives a tqdm bar on stderr, for the command line."""
    bar = tqdm(total=1000, desc=desc, bar_format="{l_bar}{bar}| {elapsed}<{remaining} {postfix}")

    def update(fraction: float, message: str) -> None:
        bar.n = int(fraction * 1000)
        bar.set_postfix_str(message, refresh=False)
        bar.refresh()
        if fraction >= 1.0:
            bar.close()

    return update


def scaled(progress: Optional[ProgressCallback], start: float, stop: float) -> Optional[ProgressCallback]:
    """Map a sub-task's [0, 1] progress onto [start, stop] of the parent's."""
    if progress is None:
        return None
    return lambda fraction, message: progress(start + (stop - start) * fraction, message)
