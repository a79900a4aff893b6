"""`megaclass index` and `megaclass search` on a small evaluated run: the neighbours equal the
eval stage's own brute-force ranking, text queries use the teacher's text tower, the HTML page
renders in headless Chromium with every image, and partial index folders are refused."""

from __future__ import annotations

import html as _html
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from megaclass.pipelines.cli import main
from megaclass.pipelines.config import load_config
from megaclass.pipelines.eval import run_eval
from megaclass.pipelines.index import MANIFEST, THUMBS_FILE, choose_index, read_manifest
from megaclass.pipelines.search import run_search

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_eval import COLORS, _image  # noqa: E402  (the eval tests' colour classes)

TEACHER = "open_clip:megaclass-tiny"  # a CLIP with a text tower (random, seeded weights)


@pytest.fixture(scope="module")
def evaluated_run(tmp_path_factory, data_helpers):
    """A run with an exported (tiny, random) student, evaluated with teacher and student on
    held-out colour classes; the eval shards also hold one damaged sample."""
    from megaclass.data.writer import ShardWriter
    from megaclass.pipelines.config import TrainConfig
    from megaclass.training.encoders import build_student
    from megaclass.training.export import export_encoder

    root = tmp_path_factory.mktemp("search")
    n = 0
    with ShardWriter(root / "shards", prefix="heldout-", maxcount=15) as w:
        for rep in range(6):
            for name, rgb in COLORS.items():
                w.write(
                    f"{name}-{rep}", _image(rgb, n), f"a {name} picture no. {rep}", {"class": name}
                )
                n += 1
    bad = data_helpers.raw_tar(
        root / "shards" / "heldout-000002.tar",
        data_helpers.sample("broken-0", b"not an image", "damaged", {"class": "red"}),
    )
    spec = "::".join([*w.shards, str(bad)])
    torch.manual_seed(0)
    run = root / "run"
    export_encoder(build_student(TrainConfig(model="open_clip:megaclass-tiny-vit", embed_dim=32)),
                   run / "export")  # fmt: skip
    overrides = [
        f"run_dir={run}",
        f"data.eval_shards={spec}",
        'eval.encoders=["teacher", "student"]',
        "eval.compact_dims=[]",
        "eval.batch_size=8",
        f"embed.image_teacher={TEACHER}",
        "embed.text_teacher=none",
    ]
    cfg_path = root / "cfg.yaml"
    from megaclass.pipelines.config import dump_config

    cfg_path.write_text(dump_config(load_config(None, overrides)))
    run_eval(load_config(cfg_path))
    # query images: the held-out JPEGs themselves, as files
    from megaclass.data.reader import iter_samples
    from megaclass.data.stats import SampleStats

    qdir = root / "queries"
    qdir.mkdir()
    files = {}
    for url in w.shards:
        for s in iter_samples(url, SampleStats(), decode=False):
            files[s.key] = qdir / f"{s.key}.{s.image_ext}"
            files[s.key].write_bytes(s.image_bytes)
    indexes = {}
    for enc, extra in (
        ("student", []),
        ("teacher", ["--flat-max", "0", "--nlist", "4", "--nprobe", "4"]),
    ):
        out = root / f"index-{enc}"
        argv = ["index", str(cfg_path), "--encoder", enc, "--shards", spec, "--out", str(out)]
        assert main(argv + extra) == 0
        indexes[enc] = out
    return {"run": run, "cfg": cfg_path, "spec": spec, "files": files, "index": indexes, "n": n}


def _reference(
    run: Path, encoder: str, q: np.ndarray, k: int
) -> tuple[list[list[str]], np.ndarray]:
    """Brute-force top-k keys (and scores) from the eval stage's own features."""
    z = np.load(run / "eval" / "features" / f"{encoder}.npz")
    scores = q.astype(np.float64) @ z["x"].astype(np.float64).T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    keys = z["keys"]
    return [keys[o].tolist() for o in order], np.take_along_axis(scores, order, 1)


def _same_ranking(got: list[dict], ref_keys: list[str], ref_scores: np.ndarray) -> None:
    """Equal keys in order, but for neighbours whose scores tie within float error."""
    assert [h["score"] for h in got] == pytest.approx(ref_scores.tolist(), abs=1e-5)
    for i, (h, key) in enumerate(zip(got, ref_keys)):
        if h["key"] != key:  # only a near-tie may swap
            assert (
                abs(ref_scores[i] - ref_scores[min(i + 1, len(ref_scores) - 1)]) < 1e-5
                or abs(ref_scores[i] - ref_scores[max(i - 1, 0)]) < 1e-5
            ), (got, ref_keys)


def test_search_returns_the_eval_stages_neighbours(evaluated_run, capsys):
    r = evaluated_run
    m = read_manifest(r["index"]["student"])
    assert m["n"] == r["n"] and m["index"]["type"] == "flat"
    assert m["read"]["skipped"] == {"undecodable_image": 1}  # the damaged sample, counted
    ivf = read_manifest(r["index"]["teacher"])["index"]
    assert (ivf["type"], ivf["nlist"], ivf["nprobe"], ivf["train_sample"]) == ("ivf", 4, 4, 30)
    rng = np.random.default_rng(0)
    keys = sorted(r["files"])
    picked = [keys[i] for i in rng.choice(len(keys), 4, replace=False)]
    k = 6
    for enc in ("student", "teacher"):
        z = np.load(r["run"] / "eval" / "features" / f"{enc}.npz")
        row = {key: i for i, key in enumerate(z["keys"].tolist())}
        _, queries = run_search(r["index"][enc], [str(r["files"][p]) for p in picked], k=k)
        ref_keys, ref_scores = _reference(r["run"], enc, z["x"][[row[p] for p in picked]], k)
        same = []
        for p, q, rk, rs in zip(picked, queries, ref_keys, ref_scores):
            assert q.kind == "image" and len(q.hits) == k
            _same_ranking(q.hits, rk, rs)
            assert q.hits[0]["key"] == p and q.hits[0]["score"] == pytest.approx(1, abs=1e-5)
            cls = z["classes"][row[p]]
            same += [h["class"] == cls for h in q.hits[1:]]
        if enc == "teacher":  # colours are easy: most neighbours are of the query's class
            assert np.mean(same) > 0.5, same
    # the command line prints keys, scores and captions
    assert main(["search", str(r["index"]["student"]), str(r["files"][picked[0]]), "-k", "3"]) == 0
    out = capsys.readouterr().out
    assert f"1.0000  {picked[0]}" in out and "a " in out and "picture no." in out


def test_ivf_with_every_list_probed_equals_flat(evaluated_run, tmp_path):
    r = evaluated_run
    flat = tmp_path / "flat"
    argv = ["index", str(r["cfg"]), "--encoder", "teacher", "--shards", r["spec"]]
    assert main(argv + ["--out", str(flat)]) == 0
    qs = [str(r["files"][k]) for k in ("red-0", "blue-3", "black-5")]
    _, a = run_search(flat, qs, k=8)
    _, b = run_search(r["index"]["teacher"], qs, k=8)
    for qa, qb in zip(a, b):  # every list probed: IVF is exact
        assert [h["key"] for h in qa.hits] == [h["key"] for h in qb.hits]
    _, c = run_search(r["index"]["teacher"], qs, k=8, nprobe=1)  # one list of 4: approximate
    assert all(0 < len(q.hits) <= 8 and q.hits[0]["key"] == p.hits[0]["key"] for q, p in zip(c, a))
    assert choose_index(1_000_000)["nlist"] == 4000 and choose_index(1_000_000)["nprobe"] == 250
    assert choose_index(100, flat_max=10)["nlist"] == 2  # capped at n/39


def test_text_queries_use_the_teachers_text_tower(evaluated_run, capsys):
    from megaclass.training.teachers import load_teacher

    r = evaluated_run
    text = "a red picture"
    _, queries = run_search(r["index"]["teacher"], [text], k=5)
    assert queries[0].kind == "text"
    q = load_teacher(TEACHER, TEACHER).encode_texts([text])
    ref_keys, ref_scores = _reference(r["run"], "teacher", q, 5)
    _same_ranking(queries[0].hits, ref_keys[0], ref_scores[0])
    # the student has no text tower: one message, exit 2
    capsys.readouterr()
    assert main(["search", str(r["index"]["student"]), text]) == 2
    err = capsys.readouterr().err
    assert "text queries need a text tower" in err and "student" in err and "Traceback" not in err


def test_incomplete_or_stale_index_is_refused(evaluated_run, tmp_path, capsys):
    r = evaluated_run
    copy = tmp_path / "copy"
    shutil.copytree(r["index"]["student"], copy)
    q = str(r["files"]["red-0"])
    with open(copy / THUMBS_FILE, "r+b") as f:  # a copy cut short
        f.truncate(100)
    assert main(["search", str(copy), q]) == 2
    assert "incomplete" in capsys.readouterr().err
    (copy / MANIFEST).unlink()  # a rebuild that never finished
    assert main(["search", str(copy), q]) == 2
    assert "not a complete index" in capsys.readouterr().err
    argv = ["index", str(r["cfg"]), "--shards", r["spec"], "--out", str(r["index"]["student"])]
    assert main(argv) == 2 and "--force" in capsys.readouterr().err
    # a retrained student: the stored vectors no longer match its queries
    stale = tmp_path / "stale"
    run2 = tmp_path / "run2"
    shutil.copytree(r["run"] / "export", run2 / "export")
    argv = ["index", str(r["cfg"]), f"run_dir={run2}", "--shards", r["spec"].split("::")[0]]
    assert main(argv + ["--out", str(stale)]) == 0
    from megaclass.pipelines.config import TrainConfig
    from megaclass.training.encoders import build_student
    from megaclass.training.export import export_encoder

    torch.manual_seed(1)
    export_encoder(build_student(TrainConfig(model="open_clip:megaclass-tiny-vit", embed_dim=32)),
                   run2 / "export")  # fmt: skip
    capsys.readouterr()
    assert main(["search", str(stale), q]) == 2
    assert "changed since" in capsys.readouterr().err


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
PROBE = """<script>
window.addEventListener('load', () => {
  const imgs = Array.from(document.images);
  const out = document.createElement('pre'); out.id = 'probe';
  out.textContent = JSON.stringify({widths: imgs.map(i => i.naturalWidth),
    sections: document.querySelectorAll('section').length});
  document.body.appendChild(out);
});
</script>"""


def test_html_page_renders_every_thumbnail_in_chromium(evaluated_run, tmp_path):
    r = evaluated_run
    page = tmp_path / "out.html"
    qs = [str(r["files"]["green-2"]), "a yellow picture"]
    assert main(["search", str(r["index"]["teacher"]), *qs, "-k", "4", "--html", str(page)]) == 0
    text = page.read_text()
    assert "<script" not in text and "http" not in text.replace("http-equiv", "")
    assert text.count("<img") == 1 + 4 + 4  # the image query, then 4 neighbours per query
    assert "a yellow picture" in text and "green-2" in text
    probe = tmp_path / "probe.html"
    probe.write_text(text.replace("</body>", PROBE + "</body>"))
    profile = tempfile.mkdtemp(prefix="chromium-profile-", dir=tmp_path)
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
           "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--virtual-time-budget=5000",
           "--dump-dom", probe.as_uri()]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=90,
                         env={**os.environ, "HOME": str(tmp_path)})  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    start = res.stdout.find('<pre id="probe">')
    assert start >= 0, res.stdout[-2000:]
    raw = res.stdout[start + len('<pre id="probe">') : res.stdout.find("</pre>", start)]
    info = json.loads(_html.unescape(raw))
    assert info["sections"] == 2 and len(info["widths"]) == 9
    assert all(w > 0 for w in info["widths"]), info  # every thumbnail decoded by the browser
