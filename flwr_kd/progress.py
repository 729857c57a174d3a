"""Progress bars for the long phases, drawn only where somebody watches.

Transfer learning, distillation, the local-only baseline and the upload of client data can
take minutes. Their bars go to stderr through tqdm with `disable=None`, which turns a bar off
whenever stderr is not a terminal: CI logs, redirected output and captured test output get
none. `leave=False` erases a finished bar, so the per-round table stays as it was.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")


def progress_bar(
    items: Iterable[T], label: str, *, total: int | None = None, unit: str = "task"
) -> Iterable[T]:
    """`items`, counted on a bar named `label` as they are consumed (on a terminal only);
    `items` themselves when `label` is empty."""
    if not label:
        return items
    return tqdm(items, desc=label, total=total, unit=unit, leave=False, disable=None)
