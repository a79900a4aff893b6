"""``megaclass search DIR QUERY… [-k 10] [--html out.html]``: nearest neighbours in an index.

Why: to see what an encoder retrieves — a held-out image's neighbours, or a caption's when the
encoder has a text tower. DIR is a folder written by ``megaclass index``
(:mod:`megaclass.pipelines.index`); the query is embedded with the encoder its manifest names,
loaded by the eval harness's :func:`~megaclass.pipelines.eval.load_encoder_for_eval`, so a query
image gets exactly the vector the same image got in the index (and in the eval stage).

Each QUERY is an image file when such a file exists, else a text. A text needs the text tower
of the same model: the index's encoder must be an open_clip model (``teacher`` with an
open_clip teacher, or ``open_clip:<model>[@weights]``), whose text tower is loaded beside the
image tower; any other encoder (a megaclass student, EfficientNet) is image-only and a text query
is refused with one message. An index whose encoder weights changed since it was built (a
retrained student) is refused too: its query vectors would not match the stored ones.

Output: per query the top-k keys, scores (cosine), classes and captions; ``--json`` prints them
as JSON; ``--html FILE`` writes one self-contained page (thumbnails embedded as data: URIs from
the index's ``thumbs.bin``, no script, no external link).
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from megaclass.clustering.faiss_import import import_faiss
from megaclass.core.atomic import write_text_atomic
from megaclass.pipelines.index import (
    INDEX_FILE,
    SAMPLES_FILE,
    THUMBS_FILE,
    SearchIndexError,
    encoder_from_record,
    read_manifest,
    thumbnail_jpeg,
)

log = logging.getLogger(__name__)


@dataclass
class SearchIndex:
    """A complete index folder, opened: the faiss index and one entry per row."""

    folder: Path
    manifest: dict[str, Any]
    index: Any
    keys: list[str]
    captions: list[str]
    classes: list[str]
    shard: np.ndarray
    members: list[str]
    offsets: np.ndarray

    def thumb(self, i: int) -> bytes:
        """The stored JPEG thumbnail of row ``i``."""
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        with open(self.folder / THUMBS_FILE, "rb") as f:
            f.seek(a)
            return f.read(b - a)

    def source(self, i: int) -> str:
        """``shard-url:member`` of row ``i`` (where the full image is)."""
        return f"{self.manifest['shards'][int(self.shard[i])]}:{self.members[i]}"


def open_index(folder: str | Path, nprobe: int | None = None) -> SearchIndex:
    """Open a complete index folder (refused when incomplete, see :func:`read_manifest`)."""
    faiss = import_faiss()

    folder = Path(folder)
    m = read_manifest(folder)
    index = faiss.read_index(str(folder / INDEX_FILE))
    with np.load(folder / SAMPLES_FILE, allow_pickle=False) as z:
        keys, captions = z["keys"].tolist(), z["captions"].tolist()
        classes, members = z["classes"].tolist(), z["members"].tolist()
        shard, offsets = z["shard"], z["thumb_offsets"]
    if index.ntotal != m["n"] or len(keys) != m["n"] or len(offsets) != m["n"] + 1:
        raise SearchIndexError(
            f"{folder}: the index holds {index.ntotal} vectors and {len(keys)} samples, the "
            f"manifest says {m['n']}; run `megaclass index` again"
        )
    if m["index"]["type"] == "ivf":
        faiss.extract_index_ivf(index).nprobe = int(nprobe or m["index"]["nprobe"])
    return SearchIndex(folder, m, index, keys, captions, classes, shard, members, offsets)


# --------------------------------------------------------------------------------------
# queries
# --------------------------------------------------------------------------------------


@dataclass
class Query:
    """One query as given on the command line: an image file, or a text."""

    given: str
    kind: str  # image | text
    thumb: bytes | None = None
    hits: list[dict[str, Any]] = field(default_factory=list)


def parse_queries(given: list[str]) -> list[Query]:
    """An existing file is an image query; anything else a text query."""
    return [Query(q, "image" if Path(q).expanduser().is_file() else "text") for q in given]


def _text_tower_of(idx: SearchIndex, device: Any, first: str) -> Any:
    """``texts -> unit rows`` of the index's encoder's own text tower, or one clear refusal
    (``first``: the first text query, named in it)."""
    from megaclass.training.teachers import OPEN_CLIP_PREFIX, load_teacher

    spec = encoder_from_record(idx.manifest["encoder"])
    model = spec.model or ""
    if spec.kind not in ("teacher", "model") or not model.startswith(OPEN_CLIP_PREFIX):
        raise SearchIndexError(
            f"query {first!r} is not an existing file, so it is a text query; "
            f"text queries need a text tower, and the index's encoder {spec.name!r} "
            f"({spec.kind}: {model or spec.path or spec.spec}) is an image encoder only; "
            "search with image files, or index with an open_clip encoder (e.g. "
            "--encoder teacher with embed.image_teacher=open_clip:<model>) to search by text"
        )
    from megaclass.training.encoders import register_tiny_configs

    register_tiny_configs()  # as load_encoder_for_eval does: the tiny test architectures
    teacher = load_teacher(model, model, spec.pretrained, device=device, image_size=spec.image_size)
    if not teacher.has_text or teacher.text_dim != idx.manifest["dim"]:
        raise SearchIndexError(
            f"text queries: {model} has no text tower of the index's dimension "
            f"{idx.manifest['dim']} (text: {teacher.text_dim})"
        )
    return teacher.encode_texts


def embed_queries(idx: SearchIndex, queries: list[Query], device: str = "auto") -> np.ndarray:
    """Unit vectors of the queries (images with the index's encoder, texts with its text tower)."""
    import torch
    from megaclass.data.reader import ImageRejected, decode_image
    from megaclass.pipelines.eval import load_encoder_for_eval
    from megaclass.pipelines.retrieval import resolve_device

    m = idx.manifest
    spec = encoder_from_record(m["encoder"])
    dev = resolve_device(device)
    now = json.loads(json.dumps(spec.fingerprint()))
    if now != m.get("encoder_fingerprint"):
        raise SearchIndexError(
            f"the weights of the index's encoder {spec.name!r} changed since {idx.folder} was "
            "built (or are gone): query vectors would not match the stored ones; rebuild the "
            "index with `megaclass index`"
        )
    out = np.zeros((len(queries), m["dim"]), np.float32)
    images = [(i, q) for i, q in enumerate(queries) if q.kind == "image"]
    texts = [(i, q) for i, q in enumerate(queries) if q.kind == "text"]
    if texts:
        encode_texts = _text_tower_of(idx, dev, texts[0][1].given)
        out[[i for i, _ in texts]] = encode_texts([q.given for _, q in texts])
    if images:
        enc = load_encoder_for_eval(spec, dev)
        pil = []
        for _, q in images:
            try:
                img = decode_image(Path(q.given).expanduser().read_bytes(), m["max_image_pixels"])
            except ImageRejected as e:
                raise SearchIndexError(
                    f"query {q.given}: not an image megaclass reads ({e.reason}; JPEG, PNG or "
                    "WEBP within data.max_image_pixels expected)"
                ) from None
            except OSError as e:
                raise SearchIndexError(f"query {q.given}: unreadable ({e})") from None
            q.thumb = thumbnail_jpeg(img)
            pil.append(img)
        x = torch.stack([enc.transform(img) for img in pil])
        feats = np.asarray(enc.encode(x), dtype=np.float32)
        if feats.shape[1] != m["dim"]:
            raise SearchIndexError(
                f"the encoder gives {feats.shape[1]}-d vectors, the index holds {m['dim']}-d"
            )
        out[[i for i, _ in images]] = feats
    return out


def search(idx: SearchIndex, queries: list[Query], x: np.ndarray, k: int) -> list[Query]:
    """Fill each query's ``hits``: rank, row, key, score, class, caption, source."""
    if k < 1:
        raise SearchIndexError(f"-k must be >= 1, got {k}")
    scores, rows = idx.index.search(np.ascontiguousarray(x, np.float32), min(k, idx.index.ntotal))
    for q, sc, rw in zip(queries, scores, rows):
        q.hits = [
            {
                "rank": r + 1,
                "row": int(i),
                "key": idx.keys[i],
                "score": float(s),
                "class": idx.classes[i],
                "caption": idx.captions[i],
                "source": idx.source(int(i)),
            }
            for r, (s, i) in enumerate(zip(sc, rw))
            if i >= 0  # IVF: fewer than k found in the probed lists
        ]
    return queries


# --------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------


def format_text(idx: SearchIndex, queries: list[Query]) -> str:
    """The plain-text result: per query a header, then one line per neighbour."""
    enc = idx.manifest["encoder"]
    lines = [
        f"index {idx.folder}: {idx.manifest['n']} images, encoder {enc.get('name')} "
        f"({idx.manifest['index']['type']})"
    ]
    for n, q in enumerate(queries, 1):
        lines.append(f"query {n} ({q.kind}): {q.given}")
        for h in q.hits:
            cls = f" [{h['class']}]" if h["class"] else ""
            cap = h["caption"].replace("\n", " ")
            cap = cap if len(cap) <= 80 else cap[:79] + "…"
            lines.append(f"  {h['rank']:>3}  {h['score']:.4f}  {h['key']}{cls}  {cap}")
    return "\n".join(lines)


CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;background:#f6f7f9;color:#1d2330}
main{max-width:1200px;margin:0 auto;padding:20px 26px 50px}h1{font-size:1.4em}
section{margin:18px 0 26px}h2{font-size:1.1em;border-bottom:1px solid #d8dce3;padding-bottom:4px}
.row{display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start}
.card{background:#fff;border:1px solid #d8dce3;padding:6px;width:150px;font-size:0.8em;word-break:break-word}
.card img{display:block;max-width:138px;max-height:138px;margin:0 auto 4px}
.query{border:2px solid #3a6ee8}.text{font-size:1.1em;font-style:italic;padding:20px 6px}
.meta{color:#5a6375}.score{font-variant-numeric:tabular-nums;font-weight:600}
"""


def _img(data: bytes, alt: str) -> str:
    b64 = base64.b64encode(data).decode()
    return f"<img alt='{html.escape(alt)}' src='data:image/jpeg;base64,{b64}'>"


def render_html(idx: SearchIndex, queries: list[Query]) -> str:
    """One self-contained page: each query beside its neighbours' thumbnails."""
    e = html.escape
    m = idx.manifest
    enc = m["encoder"]
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>megaclass search — {e(str(idx.folder))}</title>",
        f"<style>{CSS}</style></head><body><main>",
        "<h1>megaclass search</h1>",
        f"<p class='meta'>index {e(str(idx.folder))}: {m['n']} images, encoder "
        f"{e(str(enc.get('name')))} ({e(str(enc.get('spec')))}), {e(m['index']['type'])} "
        f"index; scores are cosine similarities</p>",
    ]
    for n, q in enumerate(queries, 1):
        out.append(f"<section><h2>Query {n} ({q.kind}): {e(q.given)}</h2><div class='row'>")
        if q.thumb is not None:
            out.append(f"<div class='card query'>{_img(q.thumb, q.given)}<b>query</b></div>")
        else:
            out.append(f"<div class='card query text'>“{e(q.given)}”</div>")
        for h in q.hits:
            cls = f" · class {e(h['class'])}" if h["class"] else ""
            out.append(
                f"<div class='card' title='{e(h['source'])}'>{_img(idx.thumb(h['row']), h['key'])}"
                f"<span class='score'>#{h['rank']} {h['score']:.3f}</span>{cls}<br>"
                f"<b>{e(h['key'])}</b><br><span class='meta'>{e(h['caption'][:140])}</span></div>"
            )
        out.append("</div></section>")
    out.append("</main></body></html>")
    return "\n".join(out) + "\n"


def run_search(
    folder: str | Path,
    given: list[str],
    k: int = 10,
    html_out: str | Path | None = None,
    device: str = "auto",
    nprobe: int | None = None,
) -> tuple[SearchIndex, list[Query]]:
    """Open ``folder``, embed and search every query; write the HTML page when asked."""
    if not given:
        raise SearchIndexError(
            "megaclass search: give at least one QUERY (an image file or a text)"
        )
    idx = open_index(folder, nprobe)
    queries = parse_queries(given)
    x = embed_queries(idx, queries, device)
    search(idx, queries, x, k)
    if html_out is not None:
        write_text_atomic(html_out, render_html(idx, queries))
    return idx, queries


def main(argv: list[str] | None = None) -> int:
    """``megaclass search`` (the CLI dispatches here; user errors become one line, exit 2)."""
    ap = argparse.ArgumentParser(
        prog="megaclass search",
        description="Nearest neighbours of images (files) or texts in a `megaclass index` folder.",
    )
    ap.add_argument("index_dir", help="folder written by `megaclass index`")
    ap.add_argument("queries", nargs="+", metavar="QUERY", help="image file, or text")
    ap.add_argument("-k", type=int, default=10, help="neighbours per query (default 10)")
    ap.add_argument("--html", default=None, help="also write a page with thumbnails here")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument("--nprobe", type=int, default=None, help="IVF lists to probe (default: stored)")
    ap.add_argument("--device", default="auto", help="device for the query encoder (default auto)")
    args = ap.parse_args(argv)
    idx, queries = run_search(
        args.index_dir, args.queries, args.k, args.html, args.device, args.nprobe
    )
    if args.json:
        print(
            json.dumps(
                [{"query": q.given, "kind": q.kind, "hits": q.hits} for q in queries], indent=2
            )
        )
    else:
        print(format_text(idx, queries))
    if args.html:
        print(f"megaclass search: wrote {args.html}", file=sys.stderr)
    return 0
