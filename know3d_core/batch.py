"""Batch planning and crash-safe outputs for ``know3d batch`` (no model code here).

A batch is every image x every prompt. Each pair is one :class:`BatchItem` with a stable id built
from the image's file name and the prompt text, so the same inputs give the same ids on every run,
on every machine and in every shard.

Output layout (``OUT`` = ``--out``)::

    OUT/<id>/                 one finished item (mesh, back view, normal sheet, record.json)
    OUT/.tmp-<id>-<pid>/      an item being written; renamed to OUT/<id> when complete
    OUT/summary.csv           one row per planned item (all shards), rebuilt at the end of a run
    OUT/contact_sheet.png     the normal renders of every finished item

An item is finished exactly when ``OUT/<id>`` exists: everything is written into the temporary
folder first and published with one ``os.replace`` (atomic on one file system). A run skips finished
items and deletes stale temporary folders of its own items (left by a killed run), so a rerun after
a crash, a Ctrl-C or a SIGKILL resumes where it stopped and never shows a half-written item.

Sharding (``--shard K/N``): the planned items, in plan order, are dealt round-robin; shard K gets
items ``K-1, K-1+N, ...``. Shards are disjoint, together cover the plan exactly once and need no
coordination, provided every shard sees the same images and prompts.
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import re
import shutil
import time
import unicodedata
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

from . import fileio
from .errors import one_line

__all__ = [
    "IMAGE_EXTENSIONS", "TMP_PREFIX", "RECORD_NAME", "NORMALS_NAME", "SUMMARY_NAME", "CONTACT_SHEET_NAME",
    "BatchError", "BatchItem", "ItemResult",
    "list_images", "read_prompts", "item_id", "plan_items", "parse_shard", "shard_items",
    "tmp_dir_name", "is_finished", "finished_ids", "stale_tmp_dirs", "remove_stale_tmp",
    "atomic_write_bytes", "atomic_write_text", "atomic_write_json", "item_output", "run_batch",
    "summary_rows", "write_summary", "format_table", "write_contact_sheet",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
TMP_PREFIX = ".tmp-"
RECORD_NAME = "record.json"
NORMALS_NAME = "normals.png"
SUMMARY_NAME = "summary.csv"
CONTACT_SHEET_NAME = "contact_sheet.png"


class BatchError(ValueError):
    """Bad batch inputs (no images, empty prompt file, bad --shard): the CLI exits with code 2."""


@dataclass(frozen=True)
class BatchItem:
    """One image x prompt pair.

    Attributes:
        id: stable, file-system-safe name of the item's output folder.
        image: absolute path of the front image.
        prompt: the description of the hidden back.
        index: position in the full plan (image-major, prompts in file order).
    """

    id: str
    image: str
    prompt: str
    index: int


@dataclass
class ItemResult:
    """What happened to one item in this run.

    status: ``"done"`` (generated now), ``"skipped"`` (finished before), ``"failed"``.
    """

    item: BatchItem
    status: str
    seconds: float = 0.0
    error: Optional[str] = None
    record: Optional[Dict[str, Any]] = None


# --------------------------------------------------------------------------------------- planning
def list_images(path: str) -> List[str]:
    """Image files of a folder (not recursive), sorted by name; a single image file is a list of one.

    Raises :class:`BatchError` when the path is missing or holds no image.
    """
    if os.path.isfile(path):
        if not path.lower().endswith(IMAGE_EXTENSIONS):
            raise BatchError(f"--images {path} is not an image ({', '.join(IMAGE_EXTENSIONS)})")
        return [os.path.abspath(path)]
    if not os.path.isdir(path):
        raise BatchError(f"--images {path} does not exist")
    names = sorted(
        n for n in os.listdir(path)
        if n.lower().endswith(IMAGE_EXTENSIONS) and not n.startswith(".") and os.path.isfile(os.path.join(path, n))
    )
    if not names:
        raise BatchError(f"--images {path} holds no image ({', '.join(IMAGE_EXTENSIONS)})")
    return [os.path.abspath(os.path.join(path, n)) for n in names]


def read_prompts(path: str) -> List[str]:
    """Prompts from a text file (one per line; blank lines and ``#`` comments skipped) or a JSON list
    of strings (``.json``). Duplicates are dropped (first kept). Raises :class:`BatchError`."""
    if not os.path.isfile(path):
        raise BatchError(f"--prompts {path} does not exist")
    try:
        with open(path, "r", encoding="utf-8-sig") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise BatchError(f"--prompts {path} cannot be read as UTF-8 text: {e}") from None
    if path.lower().endswith(".json"):
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            raise BatchError(f"--prompts {path} is not valid JSON: {e}") from None
        if not isinstance(doc, list) or not all(isinstance(p, str) for p in doc):
            raise BatchError(f"--prompts {path} must hold a JSON list of strings")
        lines = [p.strip() for p in doc]
    else:
        lines = [ln.strip() for ln in text.splitlines()]
        lines = [ln for ln in lines if not ln.startswith("#")]
    prompts = list(dict.fromkeys(p for p in lines if p))
    if not prompts:
        raise BatchError(f"--prompts {path} holds no prompt (one per line; '#' starts a comment)")
    return prompts


def _slug(text: str, limit: int) -> str:
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    text = re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()
    return text[:limit].strip("-") or "x"


def item_id(image: str, prompt: str) -> str:
    """``<image stem>__<prompt words>__<8 hex>``; the hash covers the image file name and the prompt,
    so ids are unique even when the readable parts are cut short."""
    name = os.path.basename(image)
    digest = hashlib.sha1(f"{name}\0{prompt}".encode("utf-8")).hexdigest()[:8]
    return f"{_slug(os.path.splitext(name)[0], 40)}__{_slug(prompt, 40)}__{digest}"


def plan_items(images: Sequence[str], prompts: Sequence[str]) -> List[BatchItem]:
    """Every image x prompt, image-major, prompts in file order."""
    items = []
    for image in images:
        for prompt in prompts:
            items.append(BatchItem(item_id(image, prompt), os.path.abspath(image), prompt, len(items)))
    ids = [it.id for it in items]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise BatchError(f"two batch items share an id ({dup[:3]}): image file names must be unique")
    return items


def parse_shard(text: Optional[str]) -> Tuple[int, int]:
    """``"K/N"`` -> ``(K, N)`` with ``1 <= K <= N``; None -> ``(1, 1)``."""
    if text is None:
        return 1, 1
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not m:
        raise BatchError(f"--shard {text!r}: expected K/N, e.g. 1/4")
    k, n = int(m.group(1)), int(m.group(2))
    if n < 1 or not 1 <= k <= n:
        raise BatchError(f"--shard {text!r}: need 1 <= K <= N (shards are numbered from 1)")
    return k, n


def shard_items(items: Sequence[BatchItem], k: int, n: int) -> List[BatchItem]:
    """The K-th of N round-robin slices of ``items`` (1-based K)."""
    return [it for i, it in enumerate(items) if i % n == k - 1]


# --------------------------------------------------------------------------------------- outputs
def tmp_dir_name(item: str, pid: Optional[int] = None) -> str:
    return f"{TMP_PREFIX}{item}-{os.getpid() if pid is None else pid}"


def is_finished(out_dir: str, item: str) -> bool:
    return os.path.isdir(os.path.join(out_dir, item))


def finished_ids(out_dir: str, items: Iterable[BatchItem]) -> List[str]:
    return [it.id for it in items if is_finished(out_dir, it.id)]


def stale_tmp_dirs(out_dir: str, ids: Optional[Iterable[str]] = None) -> List[str]:
    """Temporary entries in ``out_dir``: item folders (only those of ``ids`` when given) and files."""
    try:
        names = os.listdir(out_dir)
    except FileNotFoundError:
        return []
    wanted = None if ids is None else set(ids)
    out = []
    for n in sorted(names):
        if not n.startswith(TMP_PREFIX):
            continue
        path = os.path.join(out_dir, n)
        owner = n[len(TMP_PREFIX):].rpartition("-")[0]
        if wanted is None or owner in wanted or not os.path.isdir(path):
            out.append(path)
    return out


def remove_stale_tmp(out_dir: str, ids: Optional[Iterable[str]] = None, file_age: float = 60.0) -> List[str]:
    """Delete temporary folders left by killed runs, and temporary files (of an atomic write of the
    summary or contact sheet) older than ``file_age`` seconds. Pass the ids of the items this process
    owns, so a shard never touches the work in progress of another shard sharing ``out_dir``."""
    removed = []
    now = time.time()
    for path in stale_tmp_dirs(out_dir, ids):
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        elif now - os.path.getmtime(path) > file_age:
            with contextlib.suppress(OSError):
                os.unlink(path)
        else:
            continue
        removed.append(path)
    return removed


def _fsync_dir(path: str) -> None:
    if os.name != "posix":
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str, data: bytes) -> str:
    """Write ``data`` to a temporary file in ``path``'s folder, then ``os.replace`` it into place."""
    return fileio.atomic_write_bytes(path, data, tmp_prefix=f"{TMP_PREFIX}{os.path.basename(path)}-")


def atomic_write_text(path: str, text: str) -> str:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str, obj: Any) -> str:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


@contextlib.contextmanager
def item_output(out_dir: str, item: str) -> Iterator[str]:
    """Yield a fresh temporary folder for ``item``; publish it as ``out_dir/item`` on success.

    On any exception (KeyboardInterrupt included) the temporary folder is deleted and the exception
    propagates. If another process published the same item meanwhile, ours is discarded.
    """
    os.makedirs(out_dir, exist_ok=True)
    tmp = os.path.join(out_dir, tmp_dir_name(item))
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
        _fsync_dir(tmp)
        final = os.path.join(out_dir, item)
        try:
            os.replace(tmp, final)
        except OSError:
            if not os.path.isdir(final):
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # lost a race: the other copy is complete
        _fsync_dir(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _read_record(out_dir: str, item: str) -> Optional[Dict[str, Any]]:
    try:
        with open(os.path.join(out_dir, item, RECORD_NAME), "r", encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def run_batch(
    items: Sequence[BatchItem],
    out_dir: str,
    generate: Callable[[BatchItem, str], Optional[Dict[str, Any]]],
    progress: bool = True,
    on_result: Optional[Callable[[ItemResult], None]] = None,
) -> List[ItemResult]:
    """Run ``generate(item, tmp_folder)`` for every unfinished item; one failure never stops the rest.

    ``generate`` writes the item's files into ``tmp_folder`` and may return a small dict (kept in the
    result). Exceptions become ``"failed"`` results with a one-line reason; KeyboardInterrupt (Ctrl-C,
    or SIGTERM turned into one by the CLI) removes the partial item and propagates.
    """
    from tqdm.auto import tqdm

    os.makedirs(out_dir, exist_ok=True)
    remove_stale_tmp(out_dir, [it.id for it in items])
    results: List[ItemResult] = []
    bar = tqdm(items, desc="batch", unit="item", disable=not progress, dynamic_ncols=True)
    for item in bar:
        if is_finished(out_dir, item.id):
            result = ItemResult(item, "skipped", record=_read_record(out_dir, item.id))
        else:
            bar.set_postfix_str(item.id[:48])
            start = time.perf_counter()
            try:
                with item_output(out_dir, item.id) as tmp:
                    record = generate(item, tmp)
                result = ItemResult(item, "done", time.perf_counter() - start, record=record)
            except Exception as e:  # noqa: BLE001 - one bad item must not stop the batch
                result = ItemResult(item, "failed", time.perf_counter() - start, error=f"{type(e).__name__}: {one_line(e)}")
        results.append(result)
        if on_result is not None:
            on_result(result)
    bar.close()
    return results


# --------------------------------------------------------------------------------------- summary
SUMMARY_COLUMNS = ("id", "status", "image", "prompt", "seconds", "vertices", "faces", "peak_vram_gb", "error")


def _get(record: Optional[Dict[str, Any]], *path: str) -> Any:
    cur: Any = record
    for p in path:
        if not isinstance(cur, dict) or p not in cur:
            return None
        cur = cur[p]
    return cur


def summary_rows(
    plan: Sequence[BatchItem], out_dir: str, results: Sequence[ItemResult] = ()
) -> List[Dict[str, Any]]:
    """One row per planned item: this run's status where it ran, else ``finished`` / ``pending``.

    Numbers come from each finished item's ``record.json`` (keys ``total_seconds``, ``mesh.vertices``,
    ``mesh.faces``, ``peak_vram_gb``) when present.
    """
    by_id = {r.item.id: r for r in results}
    rows = []
    for item in plan:
        res = by_id.get(item.id)
        finished = is_finished(out_dir, item.id)
        record = _read_record(out_dir, item.id) if finished else None
        if res is not None:
            status = res.status
        else:
            status = "finished" if finished else "pending"
        seconds = _get(record, "total_seconds")
        if seconds is None and res is not None and res.status == "done":
            seconds = res.seconds
        rows.append({
            "id": item.id,
            "status": status,
            "image": os.path.basename(item.image),
            "prompt": item.prompt,
            "seconds": None if seconds is None else round(float(seconds), 2),
            "vertices": _get(record, "mesh", "vertices"),
            "faces": _get(record, "mesh", "faces"),
            "peak_vram_gb": _get(record, "peak_vram_gb"),
            "error": res.error if res is not None else None,
        })
    return rows


def write_summary(path: str, rows: Sequence[Dict[str, Any]]) -> str:
    """``rows`` as CSV (columns :data:`SUMMARY_COLUMNS`), written atomically."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=SUMMARY_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in SUMMARY_COLUMNS})
    return atomic_write_text(path, buf.getvalue())


def format_table(rows: Sequence[Dict[str, Any]], columns: Sequence[str] = ("status", "seconds", "faces", "id"),
                 max_width: int = 60) -> str:
    """A plain-text table of ``rows`` for the terminal."""
    def cell(v: Any) -> str:
        s = "-" if v is None or v == "" else str(v)
        return s if len(s) <= max_width else s[: max_width - 3] + "..."

    table = [list(columns)] + [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(columns))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_contact_sheet(
    path: str, plan: Sequence[BatchItem], out_dir: str, row_height: int = 128, label: bool = True
) -> Optional[str]:
    """One row per finished item: its ``normals.png`` scaled to ``row_height`` with the id above it.

    Returns the path written, or None when no finished item has a normal sheet.
    """
    from PIL import Image, ImageDraw

    rows = []
    for item in plan:
        p = os.path.join(out_dir, item.id, NORMALS_NAME)
        if not os.path.isfile(p):
            continue
        try:
            with Image.open(p) as im:
                im = im.convert("RGB")
                w = max(1, round(im.width * row_height / im.height))
                rows.append((item, im.resize((w, row_height), Image.BILINEAR)))
        except OSError:
            continue
    if not rows:
        return None
    text_h = 14 if label else 0
    width = max(im.width for _, im in rows)
    sheet = Image.new("RGB", (width, len(rows) * (row_height + text_h)), (24, 24, 24))
    draw = ImageDraw.Draw(sheet)
    for i, (item, im) in enumerate(rows):
        y = i * (row_height + text_h)
        if label:
            draw.text((4, y + 1), f"{item.id}", fill=(230, 230, 230))
        sheet.paste(im, (0, y + text_h))
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue())
