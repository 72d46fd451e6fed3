"""`ascl dedup`: planted near-duplicates found, the anchored grouping, CSV/Parquet, index mode, --drop, errors."""

from __future__ import annotations

import csv
import io
import sys
import threading
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ascl.cli import main
from ascl.serving.collections import dedup
from ascl.serving.collections.faiss_index import (
    GalleryIndex,
    IndexConflictError,
    manifest_version,
    read_manifest,
    writer_lock,
)

ROOT = Path(__file__).resolve().parents[1]
THRESHOLD = 0.96  # the test images: distinct originals <= ~0.94 with the shipped default, copies >= ~0.98
ORIGINALS = 18
KINDS = ("png", "jpeg", "resize", "crop", "crop+jpeg")


def original(seed: int) -> Image.Image:
    """A smooth random colour field (a 3x3 grid upsampled): distinct for every seed."""
    grid = np.random.default_rng(seed).integers(0, 256, (3, 3, 3), dtype=np.uint8)
    return Image.fromarray(grid).resize((48, 48), Image.Resampling.BICUBIC)


def copy_of(image: Image.Image, kind: str, rng: np.random.Generator) -> tuple[bytes, str]:
    out = image
    for step in kind.split("+"):
        w, h = out.size
        if step == "resize":
            f = rng.uniform(0.5, 0.75)
            out = out.resize((round(w * f), round(h * f)), Image.Resampling.BILINEAR).resize((w, h))
        elif step == "crop":
            side = round(w * rng.uniform(0.90, 0.95))
            left = (w - side) // 2
            out = out.crop((left, left, left + side, left + side))
    buf = io.BytesIO()
    if kind.endswith("jpeg"):
        out.save(buf, format="JPEG", quality=int(rng.integers(50, 71)))
        return buf.getvalue(), ".jpg"
    out.save(buf, format="PNG")
    return buf.getvalue(), ".png"


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, int]]:
    """A labelled folder: ORIGINALS originals (JPEG q95) and one copy of each kind of most of them.

    Returns (folder, relative path -> family)."""
    folder = tmp_path_factory.mktemp("planted")
    rng = np.random.default_rng(0)
    family: dict[str, int] = {}
    for i in range(ORIGINALS):
        label = folder / f"c{i % 3}"
        label.mkdir(exist_ok=True)
        image = original(i)
        image.save(label / f"{i:02d}.jpg", quality=95)
        family[f"c{i % 3}/{i:02d}.jpg"] = i
        for kind in KINDS if i % 6 else ():  # every sixth original has no copy: it must stay alone
            data, suffix = copy_of(image, kind, rng)
            name = f"{i:02d}_{kind.replace('+', '_')}{suffix}"
            (label / name).write_bytes(data)
            family[f"c{i % 3}/{name}"] = i
    return folder, family


@pytest.fixture(scope="module")
def onnx_model() -> Path:
    """The shipped default, exported once (the content-keyed cache)."""
    from ascl.serving.collections.model_files import resolve_onnx

    return resolve_onnx("default")


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def groups_of(rows: list[dict[str, object]]) -> dict[int, list[dict[str, object]]]:
    out: dict[int, list[dict[str, object]]] = {}
    for row in rows:
        out.setdefault(int(row["group"]), []).append(row)  # type: ignore[call-overload]
    return out


def test_cli_finds_every_planted_copy_and_writes_csv(planted: tuple[Path, dict[str, int]], onnx_model: Path,
                                                     tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder, family = planted
    out = tmp_path / "dups.csv"
    assert main(["dedup", str(folder), "--threshold", str(THRESHOLD), "--out", str(out),
                 "--model", str(onnx_model)]) == 0
    rows = read_csv(out)
    assert list(rows[0]) == ["group", "path", "similarity", "label"]  # no id: images, not an index
    groups = groups_of(rows)  # type: ignore[arg-type]
    with_copies = {f for p, f in family.items() if "_" in p}
    assert len(groups) == len(with_copies)
    for members in groups.values():
        families = {family[str(m["path"])] for m in members}
        assert len(families) == 1, members  # no group mixes two originals
        (f,) = families
        assert {str(m["path"]) for m in members} == {p for p, g in family.items() if g == f}  # every copy is in it
        assert float(str(members[0]["similarity"])) == 1.0 and "_" not in str(members[0]["path"])  # the original
        assert all(float(str(m["similarity"])) >= THRESHOLD - 1e-6 for m in members)
        assert len({m["label"] for m in members}) == 1
    summary = capsys.readouterr().out
    assert f"{len(family)} images: {len(groups)} groups" in summary and f"threshold {THRESHOLD:g}" in summary
    assert f"wrote {len(rows)} rows" in summary
    assert len(rows) == len(family) - (ORIGINALS - len(with_copies))  # singletons are not written


def test_index_mode_equals_images_mode_and_parquet_reads_back(
        planted: tuple[Path, dict[str, int]], onnx_model: Path, tmp_path: Path) -> None:
    folder, _ = planted
    idx = tmp_path / "idx"
    assert main(["index", "build", "--model", str(onnx_model), "--images", str(folder), "--out", str(idx)]) == 0
    assert main(["dedup", str(folder), "--threshold", str(THRESHOLD), "--out", str(tmp_path / "a.parquet"),
                 "--model", str(onnx_model)]) == 0
    assert main(["dedup", "--index", str(idx), "--threshold", str(THRESHOLD), "--out", str(tmp_path / "b.parquet")]) == 0
    a = pq.read_table(tmp_path / "a.parquet").to_pylist()
    b = pq.read_table(tmp_path / "b.parquet").to_pylist()
    assert pq.read_schema(tmp_path / "b.parquet").names == ["group", "path", "similarity", "id", "label"]
    assert [(r["group"], r["path"], r["label"]) for r in a] == [(r["group"], r["path"], r["label"]) for r in b]
    assert np.allclose([r["similarity"] for r in a], [r["similarity"] for r in b], atol=1e-5)
    ids = {int(i): m["path"] for i, m in GalleryIndex.load(idx).metadata.items()}
    assert all(ids[r["id"]] == r["path"] for r in b)


def test_anchored_groups_do_not_chain_and_chunks_agree() -> None:
    # A ~ B and B ~ C at 0.96, A ~ C at 0.85: B joins A's group, C (not within T of A) stays out.
    a = np.array([1.0, 0.0, 0.0], np.float32)
    b = np.array([np.cos(0.28), np.sin(0.28), 0.0], np.float32)
    c = np.array([np.cos(0.56), np.sin(0.56), 0.0], np.float32)
    (group,) = dedup.group_near_duplicates(np.stack([a, b, c]), 0.95)
    assert group.members == [0, 1] and group.similarity[0] == 1.0 and group.similarity[1] >= 0.95
    # Random vectors with planted near copies: every chunk size gives the same groups, all exact.
    rng = np.random.default_rng(0)
    base = rng.standard_normal((600, 16)).astype(np.float32)
    base[500:] = base[rng.choice(500, 100)] + 0.05 * rng.standard_normal((100, 16)).astype(np.float32)
    vectors = base / np.linalg.norm(base, axis=1, keepdims=True)
    full = dedup.group_near_duplicates(vectors, 0.97)
    assert len(full) >= 80  # 100 copies of ~90 distinct originals
    for chunk in (1, 7, 100):
        assert [(g.members, g.similarity) for g in dedup.group_near_duplicates(vectors, 0.97, chunk=chunk)] == [
            (g.members, g.similarity) for g in full]
    sims = vectors @ vectors.T
    for g in full:
        assert all(abs(sims[g.members[0], m] - s) < 1e-5 and s >= 0.97 - 1e-6 for m, s in zip(g.members, g.similarity,
                                                                                                 strict=True))
    # Exact copies score 1.0 even at threshold 1.
    assert [g.members for g in dedup.group_near_duplicates(np.stack([a, b, a, a]), 1.0)] == [[0, 2, 3]]


@pytest.mark.parametrize("factory", ["Flat", "HNSW32", "IVF4,PQ8x4fs,Refine(SQ8)", "IVF4,Flat", "SQ8"])
def test_index_types_give_back_their_vectors(tmp_path: Path, factory: str) -> None:
    rng = np.random.default_rng(1)
    base = rng.standard_normal((300, 32)).astype(np.float32)
    base[250:] = base[:50] + 0.03 * rng.standard_normal((50, 32)).astype(np.float32)
    vectors = base / np.linalg.norm(base, axis=1, keepdims=True)
    index = GalleryIndex.create(32, factory)
    index.add(vectors, [{"path": f"{i}.png", "label": None} for i in range(300)])
    index.save(tmp_path)
    result = dedup.dedup_index(tmp_path, 0.95, progress=False)
    assert result.vectors_from == "index"
    pairs = {(g.members[0], m) for g in result.groups for m in g.members[1:]}
    assert pairs == {(i, 250 + i) for i in range(50)}  # exactly the planted copies
    assert [r["id"] for r in result.records] == list(range(300))


def test_lossy_index_is_embedded_again_from_its_images(planted: tuple[Path, dict[str, int]], onnx_model: Path,
                                                       tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder, _ = planted
    idx = tmp_path / "idx"
    assert main(["index", "build", "--model", str(onnx_model), "--images", str(folder), "--out", str(idx),
                 "--factory", "IVF2,PQ8x4fs"]) == 0  # PQ codes without a refinement: lossy
    capsys.readouterr()
    assert main(["dedup", "--index", str(idx), "--threshold", str(THRESHOLD), "--out", str(tmp_path / "b.csv")]) == 0
    assert "embedding the index's images again" in capsys.readouterr().err
    assert main(["dedup", str(folder), "--threshold", str(THRESHOLD), "--out", str(tmp_path / "a.csv"),
                 "--model", str(onnx_model)]) == 0
    a, b = read_csv(tmp_path / "a.csv"), read_csv(tmp_path / "b.csv")
    assert [(r["group"], r["path"]) for r in a] == [(r["group"], r["path"]) for r in b]


def test_drop_keeps_one_per_group_and_waits_for_another_writer(
        planted: tuple[Path, dict[str, int]], onnx_model: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    folder, family = planted
    idx = tmp_path / "idx"
    assert main(["index", "build", "--model", str(onnx_model), "--images", str(folder), "--out", str(idx)]) == 0
    before = GalleryIndex.load(idx)
    version = before.version
    holding, waiting, added = threading.Event(), threading.Event(), {}

    def say(text: str) -> None:
        print(text, file=sys.stderr)
        if "waiting for" in text:
            waiting.set()

    monkeypatch.setattr(dedup, "_say", say)

    def other_writer() -> None:  # holds the lock until dedup --drop waits for it, then adds one image
        with writer_lock(idx, who="the test's other writer"):
            holding.set()
            waiting.wait(60)
            index = GalleryIndex.load(idx)
            late = np.random.default_rng(5).standard_normal((1, index.dim)).astype(np.float32)  # no one's duplicate
            added["ids"] = index.add(late / np.linalg.norm(late), [{"path": "late.png", "label": None}])
            index.save(idx)

    thread = threading.Thread(target=other_writer)
    thread.start()
    holding.wait(10)
    capsys.readouterr()
    assert main(["dedup", "--index", str(idx), "--threshold", str(THRESHOLD), "--out", str(tmp_path / "d.csv"),
                 "--drop"]) == 0
    thread.join()
    out = capsys.readouterr()
    rows = read_csv(tmp_path / "d.csv")
    groups = groups_of(rows)  # type: ignore[arg-type]
    dropped = len(rows) - len(groups)
    assert f"removed {dropped} duplicates" in out.out and "waiting for" in out.err
    after = GalleryIndex.load(idx)
    assert after.version == version + 2 == manifest_version(idx)  # the other writer's version, then the drop's
    assert int(added["ids"][0]) in after.metadata  # the other writer's image was not trampled
    kept = {m["path"] for m in after.metadata.values()}
    assert {str(g[0]["path"]) for g in groups.values()} <= kept
    assert not kept & {str(m["path"]) for g in groups.values() for m in g[1:]}
    assert after.ntotal == len(family) + 1 - dropped == read_manifest(idx)["count"]
    # The index still searches, and the originals find themselves first.
    firsts = [int(str(g[0]["id"])) for g in groups.values()]
    vectors = np.stack([before.index.reconstruct(i) for i in firsts])
    _, ids = after.search(vectors, 1)
    assert ids[:, 0].tolist() == firsts
    # Once dropped, nothing is left to drop.
    assert main(["dedup", "--index", str(idx), "--threshold", str(THRESHOLD), "--out", str(tmp_path / "e.csv"),
                 "--drop"]) == 0
    assert "removed 0 duplicates" in capsys.readouterr().out and manifest_version(idx) == version + 2


def test_drop_refuses_when_the_kept_image_went_meanwhile(tmp_path: Path) -> None:
    from ascl.serving.online.gallery import remove_images

    index = GalleryIndex.create(4, "Flat")
    index.add(np.eye(4, dtype=np.float32), [{"path": f"{i}.png"} for i in range(4)])
    index.save(tmp_path)
    with pytest.raises(IndexConflictError, match="removed meanwhile"):
        remove_images(tmp_path, [1], only_if_present=[0, 9])
    assert manifest_version(tmp_path) == 1 and GalleryIndex.load(tmp_path).ntotal == 4
    assert len(remove_images(tmp_path, [1], only_if_present=[0]).results) == 1


@pytest.mark.parametrize(("args", "message"), [
    (["IMG", "--threshold", "0", "--out", "x.csv"], "must be in (0, 1]"),
    (["IMG", "--threshold", "1.5", "--out", "x.csv"], "must be in (0, 1]"),
    (["IMG", "--threshold", "high", "--out", "x.csv"], "must be a number"),
    (["IMG", "--out", "x.txt"], "must end in .csv or .parquet"),
    (["IMG", "--out", "x.csv", "--drop"], "--drop removes duplicates from an index: it needs --index"),
    (["--out", "x.csv"], "give either IMAGES"),
    (["IMG", "--index", "IDX", "--out", "x.csv"], "not both"),
    (["NOSUCHFOLDER", "--out", "x.csv", "--model", "MODEL"], "no such folder"),
    (["--index", "NOSUCHINDEX", "--out", "x.csv"], "not an index folder"),
])
def test_bad_input_exits_2_with_a_clear_message(args: list[str], message: str, planted: tuple[Path, dict[str, int]],
                                                onnx_model: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    swap = {"IMG": str(planted[0]), "IDX": str(tmp_path), "MODEL": str(onnx_model),
            "x.csv": str(tmp_path / "x.csv"), "x.txt": str(tmp_path / "x.txt"),
            "NOSUCHFOLDER": str(tmp_path / "nothing"), "NOSUCHINDEX": str(tmp_path / "nothing")}
    assert main(["dedup", *[swap.get(a, a) for a in args]]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x.csv").exists()


def test_parquet_without_pyarrow_names_the_install(planted: tuple[Path, dict[str, int]], tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow -> ImportError
    assert main(["dedup", str(planted[0]), "--out", str(tmp_path / "x.parquet")]) == 2
    assert "pip install pyarrow" in capsys.readouterr().err


def test_cli_default_threshold_is_the_library_default() -> None:
    from ascl.serving.collections import dedup_cli

    assert dedup_cli.DEFAULT_THRESHOLD == dedup.DEFAULT_THRESHOLD


@pytest.mark.slow
def test_benchmark_runs_tiny(cifar_tar: Path, tmp_path: Path) -> None:
    import json
    import subprocess

    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "dedup.py"), "--data", f"cifar10-offline:{cifar_tar}",
                           "--n", "60", "--planted", "14", "--scale", "0", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads((tmp_path / "dedup.json").read_text())
    assert record["data"]["planted_copies"] == 14 and record["machine"]["load_average_before"]
    assert {r["threshold"] for r in record["thresholds"]} >= {0.9, 0.95} and (tmp_path / "dedup.png").is_file()
