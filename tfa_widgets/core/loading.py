"""Training examples in batches, in a fixed order, read in the main process or by
``torch.utils.data.DataLoader`` workers.

Reading and decoding images (a user's JPEGs, their transforms) can cost more than the gradients
of a small model; workers do it in parallel while the main process computes. The batches come
back in the order they were asked for, whatever the number of workers, so an index built with
workers is the index built without them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from torch.utils.data import DataLoader, Dataset

ReadItem = Callable[[int], tuple]


class _ItemsByIndex(Dataset):
    """A map-style view of ``read_item`` (which checks what the user's dataset yields)."""

    def __init__(self, read_item: ReadItem, size: int) -> None:
        self.read_item = read_item
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> tuple:
        return self.read_item(i)


def _as_list(items: list) -> list:
    return items


def load_items(
    read_item: ReadItem, size: int, batches: Sequence[Sequence[int]], num_workers: int = 0
) -> Iterator[list[tuple]]:
    """Yield the items ``read_item(i)`` of each batch of indices, batch by batch, in order.

    Parameters
    ----------
    read_item : callable
        Maps a training index to its ``(image, label)``; called in the workers when there are
        some (with Linux's default ``fork`` start, it and its dataset need not be picklable).
    size : int
        Number of training examples.
    batches : sequence of sequences of int
        The batches, in the order they are wanted.
    num_workers : int
        ``0`` reads in this process; more starts that many ``DataLoader`` workers.

    Returns
    -------
    iterator of list of tuple
        One list of items per batch.
    """
    if num_workers == 0:
        for indices in batches:
            yield [read_item(int(i)) for i in indices]
        return
    loader = DataLoader(
        _ItemsByIndex(read_item, size),
        batch_sampler=[[int(i) for i in indices] for indices in batches],
        num_workers=num_workers,
        collate_fn=_as_list,
    )
    yield from loader
