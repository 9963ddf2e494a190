"""Batch planning, sharding and crash-safe outputs (know3d_core.batch); no model code involved."""
import json
import os

import pytest

from know3d_core import batch as B


def _images(folder, names):
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    for n in names:
        Image.new("RGB", (8, 8), (255, 0, 0)).save(os.path.join(folder, n))
    return str(folder)


def _read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def _json(path):
    return json.loads(_read(path))


def test_list_images_and_prompts(tmp_path):
    d = _images(tmp_path / "imgs", ["b.png", "a.jpg", "c.webp"])
    (tmp_path / "imgs" / "notes.txt").write_text("x")
    (tmp_path / "imgs" / ".hidden.png").write_bytes(b"")
    assert [os.path.basename(p) for p in B.list_images(d)] == ["a.jpg", "b.png", "c.webp"]
    p = tmp_path / "prompts.txt"
    p.write_text("# header\n  slats  \n\nsolid back\nslats\n", encoding="utf-8")
    assert B.read_prompts(str(p)) == ["slats", "solid back"]  # stripped, comments/blank/duplicates dropped
    j = tmp_path / "prompts.json"
    j.write_text(json.dumps(["one", "two"]))
    assert B.read_prompts(str(j)) == ["one", "two"]


@pytest.mark.parametrize("make, match", [
    (lambda t: str(t / "nowhere"), "does not exist"),
    (lambda t: (os.makedirs(t / "empty"), str(t / "empty"))[1], "holds no image"),
])
def test_bad_image_folders(tmp_path, make, match):
    with pytest.raises(B.BatchError, match=match):
        B.list_images(make(tmp_path))


def test_bad_prompt_files(tmp_path):
    p = tmp_path / "p.txt"
    p.write_text("# only a comment\n\n")
    with pytest.raises(B.BatchError, match="holds no prompt"):
        B.read_prompts(str(p))
    j = tmp_path / "p.json"
    j.write_text('{"a": 1}')
    with pytest.raises(B.BatchError, match="JSON list of strings"):
        B.read_prompts(str(j))
    with pytest.raises(B.BatchError, match="does not exist"):
        B.read_prompts(str(tmp_path / "none.txt"))


def test_item_ids_are_stable_unique_and_safe():
    a = B.item_id("/x/chair.png", "a hollow backrest, three slats!")
    assert a == B.item_id("/other/folder/chair.png", "a hollow backrest, three slats!")  # name + prompt only
    assert a.startswith("chair__a-hollow-backrest-three-slats__")
    assert B.item_id("/x/chair.jpg", "a hollow backrest, three slats!") != a  # extension is part of the name
    long = "word " * 100
    assert B.item_id("/x/chair.png", long) != B.item_id("/x/chair.png", long + "more")  # hash disambiguates
    weird = B.item_id("/x/Stühle ünd/../ch air.png", "é/\\:*?\"<>|")
    assert all(c.isalnum() or c in "-_" for c in weird)
    plan = B.plan_items(["/i/a.png", "/i/b.png"], ["p1", "p2", "p3"])
    assert [(os.path.basename(i.image), i.prompt) for i in plan] == [
        ("a.png", "p1"), ("a.png", "p2"), ("a.png", "p3"), ("b.png", "p1"), ("b.png", "p2"), ("b.png", "p3")]
    assert [i.index for i in plan] == list(range(6))
    with pytest.raises(B.BatchError, match="unique"):
        B.plan_items(["/i/a.png", "/j/a.png"], ["p"])


@pytest.mark.parametrize("n_items", [0, 1, 5, 12, 13])
@pytest.mark.parametrize("n", [1, 2, 3, 7])
def test_shards_partition_the_plan(n_items, n):
    plan = B.plan_items([f"/i/{k}.png" for k in range(n_items)], ["p"])
    shards = [B.shard_items(plan, k, n) for k in range(1, n + 1)]
    ids = [it.id for s in shards for it in s]
    assert sorted(ids) == sorted(it.id for it in plan)  # cover exactly once
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1  # balanced


@pytest.mark.parametrize("text, expected", [(None, (1, 1)), ("1/1", (1, 1)), ("2/4", (2, 4)), (" 3 / 3 ", (3, 3))])
def test_parse_shard(text, expected):
    assert B.parse_shard(text) == expected


@pytest.mark.parametrize("text", ["0/2", "3/2", "1/0", "1-2", "a/b", "1/2/3", ""])
def test_parse_shard_rejects(text):
    with pytest.raises(B.BatchError, match="--shard"):
        B.parse_shard(text)


def test_item_output_publishes_atomically(tmp_path):
    out = str(tmp_path / "out")
    with B.item_output(out, "item1") as tmp:
        assert os.path.basename(tmp) == B.tmp_dir_name("item1")
        assert not B.is_finished(out, "item1")  # invisible while being written
        with open(os.path.join(tmp, "a.txt"), "w") as f:
            f.write("x")
    assert B.is_finished(out, "item1")
    assert os.listdir(out) == ["item1"]
    assert _read(os.path.join(out, "item1", "a.txt")) == "x"


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_item_output_leaves_nothing_on_error(tmp_path, exc):
    out = str(tmp_path / "out")
    with pytest.raises(exc):
        with B.item_output(out, "item1") as tmp:
            with open(os.path.join(tmp, "half.txt"), "w") as f:
                f.write("x")
            raise exc()
    assert os.listdir(out) == []


def test_item_output_lost_race_keeps_the_other_copy(tmp_path):
    out = str(tmp_path / "out")
    with B.item_output(out, "item1") as tmp:
        os.makedirs(os.path.join(out, "item1"))  # another process finished the same item meanwhile
        with open(os.path.join(out, "item1", "theirs"), "w") as f:
            f.write("1")
        with open(os.path.join(tmp, "ours"), "w") as f:
            f.write("2")
    assert os.listdir(os.path.join(out, "item1")) == ["theirs"]
    assert os.listdir(out) == ["item1"]


def test_stale_tmp_only_of_own_items(tmp_path):
    out = tmp_path / "out"
    for name in (".tmp-a-11", ".tmp-b-22", ".tmp-a-b-33"):
        os.makedirs(out / name)
    os.makedirs(out / "a")
    removed = B.remove_stale_tmp(str(out), ["a", "a-b"])
    assert sorted(os.path.basename(p) for p in removed) == [".tmp-a-11", ".tmp-a-b-33"]
    assert sorted(os.listdir(out)) == [".tmp-b-22", "a"]  # another shard's work in progress survives


def test_stale_tmp_files_removed_only_when_old(tmp_path):
    out = tmp_path / "out"
    os.makedirs(out)
    fresh, old = out / ".tmp-summary.csv-fresh", out / ".tmp-summary.csv-old"
    fresh.write_text("x")
    old.write_text("x")
    os.utime(old, (1, 1))
    B.remove_stale_tmp(str(out), [])
    assert sorted(os.listdir(out)) == [".tmp-summary.csv-fresh"]


def test_atomic_write_replaces_and_cleans_up(tmp_path, monkeypatch):
    p = str(tmp_path / "f.json")
    B.atomic_write_json(p, {"a": 1})
    B.atomic_write_json(p, {"a": 2})
    assert _json(p) == {"a": 2}
    assert os.listdir(tmp_path) == ["f.json"]

    def boom(*a):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(KeyboardInterrupt):
        B.atomic_write_text(p, "new")
    assert os.listdir(tmp_path) == ["f.json"] and _json(p) == {"a": 2}


def _fake_generate(calls, fail_on=()):
    def generate(item, folder):
        calls.append(item.id)
        if item.prompt in fail_on:
            raise ValueError(f"bad\nprompt {item.prompt}")
        with open(os.path.join(folder, B.RECORD_NAME), "w") as f:
            json.dump({"total_seconds": 1.5, "mesh": {"vertices": 8, "faces": 12}}, f)
        return {"ok": True}
    return generate


def test_run_batch_skips_finished_and_survives_failures(tmp_path):
    out = str(tmp_path / "out")
    plan = B.plan_items(["/i/a.png", "/i/b.png"], ["good", "bad"])
    calls = []
    results = B.run_batch(plan, out, _fake_generate(calls, fail_on={"bad"}), progress=False)
    assert [r.status for r in results] == ["done", "failed", "done", "failed"]
    assert results[1].error == "ValueError: bad prompt bad"  # one line
    assert sorted(os.listdir(out)) == sorted(it.id for it in plan if it.prompt == "good")
    calls.clear()
    results = B.run_batch(plan, out, _fake_generate(calls), progress=False)
    assert [r.status for r in results] == ["skipped", "done", "skipped", "done"]
    assert calls == [plan[1].id, plan[3].id]  # only the unfinished ones ran again
    rows = B.summary_rows(plan, out, results)
    assert [r["status"] for r in rows] == ["skipped", "done", "skipped", "done"]
    assert all(r["faces"] == 12 and r["seconds"] == 1.5 for r in rows)  # what _fake_generate's record says


def test_run_batch_interrupt_keeps_finished_items_only(tmp_path):
    out = str(tmp_path / "out")
    plan = B.plan_items(["/i/a.png"], ["p1", "p2", "p3"])

    def generate(item, folder):
        open(os.path.join(folder, "part"), "w").close()
        if item.index == 1:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        B.run_batch(plan, out, generate, progress=False)
    assert os.listdir(out) == [plan[0].id]


def test_summary_and_contact_sheet(tmp_path):
    from PIL import Image

    out = str(tmp_path / "out")
    plan = B.plan_items(["/i/a.png", "/i/b.png"], ["p"])
    os.makedirs(os.path.join(out, plan[0].id))
    Image.new("RGB", (64, 16), (0, 0, 255)).save(os.path.join(out, plan[0].id, B.NORMALS_NAME))
    rows = B.summary_rows(plan, out)
    assert [r["status"] for r in rows] == ["finished", "pending"]
    path = B.write_summary(os.path.join(out, B.SUMMARY_NAME), rows)
    text = _read(path).splitlines()
    assert text[0] == ",".join(B.SUMMARY_COLUMNS) and len(text) == 3
    sheet = B.write_contact_sheet(os.path.join(out, B.CONTACT_SHEET_NAME), plan, out, row_height=32)
    with Image.open(sheet) as im:
        assert im.size == (128, 32 + 14)  # one finished row, 64x16 scaled to height 32, plus its label
    assert B.write_contact_sheet(os.path.join(out, "none.png"), plan[1:], out) is None
    table = B.format_table(rows)
    assert "finished" in table and "pending" in table
