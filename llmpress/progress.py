"""Progress bars and status lines (rich), with markup off: what they show comes from the user
(paths, dataset specs, module names), and rich would read ``[/abs/path]`` as a closing tag."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def _columns(title: str):
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return (TextColumn(title, style="bold", markup=False), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.description}", markup=False), TimeElapsedColumn(), TimeRemainingColumn())


class Progress:
    """A bar over ``total`` steps whose description names the current work (block and module)."""

    def __init__(self, total: int, enabled: bool, title: str = "compress"):
        self.enabled = enabled
        self._bar = None
        if enabled:
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(*_columns(title), transient=False)
            self._task = self._bar.add_task("", total=total)

    def __enter__(self):
        if self._bar:
            self._bar.__enter__()
        return self

    def __exit__(self, *exc):
        if self._bar:
            self._bar.__exit__(*exc)

    def describe(self, text: str) -> None:
        if self._bar:
            self._bar.update(self._task, description=text)

    def advance(self) -> None:
        if self._bar:
            self._bar.advance(self._task)


def track(items: Iterable[T], title: str, total: int, enabled: bool = True) -> Iterator[T]:
    """``items`` under a bar titled ``title`` (shown as given, never parsed as markup)."""
    with Progress(total, enabled, title=title) as bar:
        for item in items:
            yield item
            bar.advance()


class Status:
    """A one-line status for work without a step count (the HARP fit)."""

    def __init__(self, enabled: bool):
        self.enabled, self._status = enabled, None

    def __enter__(self):
        if self.enabled:
            from rich.console import Console

            self._status = Console(stderr=True).status("")
            self._status.__enter__()
        return self

    def __call__(self, text: str) -> None:
        if self._status is not None:
            from rich.text import Text

            self._status.update(Text(text))

    def __exit__(self, *exc):
        if self._status is not None:
            self._status.__exit__(*exc)


def note(text: str) -> None:
    """One line to stderr for the user (shown as given, never parsed as markup)."""
    from rich.console import Console

    Console(stderr=True, markup=False, highlight=False).print(text, soft_wrap=True)
