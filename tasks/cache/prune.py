"""Listing and pruning the cache: entries, checkpoint files and leftovers, oldest first."""

from __future__ import annotations

import time
from collections import Counter

from trainflow.tasks.cache.store import LEFTOVER_AGE_S, CacheStore, Entry


def list_entries(url: str) -> list[Entry]:
    """Cache entries, checkpoint files and leftovers, oldest first."""
    return sorted(CacheStore(url).entries(), key=lambda e: e.created)


def prune(url: str, older_than_s: float | None = None, max_bytes: int | None = None) -> list[Entry]:
    """Remove the leftovers, then the oldest entries: all older than `older_than_s`, then until
    ≤ `max_bytes`.

    A leftover (a killed writer's temporary file, a blob no record names) is of no use to any
    run: it goes whatever the limits, once untouched for LEFTOVER_AGE_S; before that it may be
    a writer's at work. A record goes before its blob, so a concurrent reader sees a miss,
    never half an entry; a blob still named by a kept record (equal outputs share one) stays,
    and counts once.
    """
    store = CacheStore(url)
    entries = list_entries(url)
    users = Counter(e.blob for e in entries if e.blob)
    blob_sizes = {e.blob: e.blob_size for e in entries if e.blob}
    total = sum(e.record_size for e in entries) + sum(blob_sizes.values())
    now = time.time()
    removed = []
    for entry in sorted(entries, key=lambda e: not e.leftover):  # leftovers first, then by age
        if entry.leftover:
            # Checked again right before the delete: a write of an equal blob since the
            # listing renamed a new file onto it, which its record is about to name.
            if now - entry.created < LEFTOVER_AGE_S or store.changed(entry):
                continue
        else:
            too_old = older_than_s is not None and now - entry.created > older_than_s
            too_big = max_bytes is not None and total > max_bytes
            if not (too_old or too_big):
                continue
        store.remove(entry)
        removed.append(entry)
        total -= entry.record_size
        if entry.blob:
            users[entry.blob] -= 1
            if users[entry.blob] == 0:
                store.remove_blob(entry.blob)
                total -= entry.blob_size
    return removed
