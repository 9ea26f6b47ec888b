"""The static HTML report, opened in headless Chromium (Debian's `chromium`; `make browser` installs it)."""

import json
import shutil
import subprocess

import numpy as np
import pytest
from test_neuron_explainer import make_planted

from neuron_explainer import RecordConfig, build_feature_records, interpret_features, write_html, write_summary
from neuron_explainer.html import example_html
from neuron_explainer.records import build_feature_record

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _dump_dom(path, profile) -> str:
    """The DOM Chromium builds from the page (what a reader sees), as HTML text."""
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={profile}",
        "--dump-dom",
        path.resolve().as_uri(),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_example_html_escapes_and_shades():
    h = example_html(["<b>x</b>", ' "q"&'], [0.0, 2.0], 2.0)
    assert "<b>x</b>" not in h and "&lt;b&gt;x&lt;/b&gt;" in h and "&quot;q&quot;&amp;" in h
    assert "rgba(255, 120, 0, 1.00)" in h and "rgba(255, 120, 0, 0.00)" in h


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (run `make browser`)")
def test_report_opens_in_headless_chromium(tmp_path):
    ids, vocab, acts = make_planted(N=200)
    records = build_feature_records(ids, acts[..., :2], vocab, cfg=RecordConfig(window=16))
    # a feature whose tokens try to inject markup: it must show as text
    evil = [["<script>alert(1)</script>", " ok", "</div>"]] * 4
    records.append(build_feature_record(evil, np.array([[1.0, 0.0, 0.5]] * 4), 7, RecordConfig(window=3)))
    records[1].extras = {
        "logits": {"promoted": [[" York", 2.5], [" City", 1.25]], "suppressed": [["<b>", -3.0]]},
        "neighbours": [{"index": 0, "cosine": 0.5}, {"index": 99, "cosine": 0.25}],  # 99 has no page
    }
    interpret_features(records, tmp_path, "sae")
    summary = json.loads(write_summary(tmp_path).read_text())
    index = write_html(tmp_path, summary)

    dom = _dump_dom(index, tmp_path / "profile")
    assert "Feature interpretations" in dom
    assert 'fires on " York" after " New"' in dom.replace("&quot;", '"')
    assert dom.count('class="tok"') == 2 * 16 + 3  # one shaded top example per feature row
    assert "<script>" not in dom and "&lt;script&gt;alert(1)&lt;/script&gt;" in dom

    page = _dump_dom(tmp_path / "pages" / "sae_000001.html", tmp_path / "profile")
    assert "York" in page and 'class="histogram"' in page and "<svg" in page
    top = page.split('class="top-examples"', 1)[1].split("</div></div>", 1)[0]
    assert top.count('class="example"') == 10 and top.count('class="tok"') == 10 * 16
    assert "correlation_all" in page
    # the dashboard: labelled density axes, logit effects (escaped), linked neighbours, quantile examples
    hist = page.split('class="histogram"', 1)[1].split("</svg>", 1)[0]
    assert ">activation</text>" in hist and ">tokens</text>" in hist  # matplotlib's axes, labels kept as text
    assert "' York'" in page and "+2.500" in page and "&lt;b&gt;" in page and "-3.000" in page
    near = page.split('class="neighbours"', 1)[1].split("</ul>", 1)[0]
    assert '<a href="sae_000000.html">' in near and "sae 99 (cosine 0.250)" in near and "sae_000099" not in near
    assert page.count("<h3>quantile ") == 5 and 'class="quantiles"' in page
    assert "95% interval" in dom and "not enough scored features to compare" in dom  # one method only


def _screenshot(path, profile, out, height: int) -> np.ndarray:
    """The page as headless Chromium paints it, [height, 1200, channels] in 0..1."""
    from matplotlib.image import imread

    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
           f"--user-data-dir={profile}", f"--window-size=1200,{height}", f"--screenshot={out}",
           path.resolve().as_uri()]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and out.is_file(), r.stderr[-2000:]
    return imread(out)


def _painted_rows(img: np.ndarray) -> np.ndarray:
    """Which pixel rows hold anything but the white page."""
    return (img[..., :3] < 0.9).any(axis=(1, 2))


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (run `make browser`)")
def test_the_feature_and_sae_pages_render_every_section(tmp_path):
    """Screenshots, not just files: each page is painted from top to bottom, and its DOM holds every section."""
    ids, vocab, acts = make_planted(N=200)
    records = build_feature_records(ids, acts[..., :2], vocab, cfg=RecordConfig(window=16))
    records[1].extras = {"logits": {"promoted": [[" York", 2.5]], "suppressed": [[" a", -1.0]]},
                         "neighbours": [{"index": 0, "cosine": 0.5}]}  # fmt: skip
    records[0].extras = {"logits_note": "the model has no language-model head"}
    interpret_features(records, tmp_path, "sae")
    (tmp_path / "sae.json").write_text(json.dumps({
        "sae_dir": "runs/x/saes/relu_d8", "n_latents": 8, "tokens": 6400, "dead_latents": 3, "mean_l0": 1.5,
        "firing_rate_histogram": {"edges": [-3.0, -2.0, -1.0], "counts": [2.0, 3.0]},
        "l0_histogram": {"edges": [0.0, 1.0, 2.0, 3.0], "counts": [10.0, 40.0, 20.0]},
        "metrics": {"fvu": 0.25, "l0": 1.5, "ce_loss_recovered": None}, "metrics_note": None,
    }))  # fmt: skip
    write_html(tmp_path, json.loads(write_summary(tmp_path).read_text()))

    page = tmp_path / "pages" / "sae_000001.html"
    dom = _dump_dom(page, tmp_path / "profile")
    for section in ("Scores", "95% interval (windows resampled)", "log10 density", "Activation density",
                    "Logit effects", "Nearest features", "Top examples", "Examples by activation quantile",
                    "windows peaking at"):  # fmt: skip
        assert section in dom, section
    assert "+2.500" in dom and '<a href="sae_000000.html">' in dom
    assert "No logit effects: the model has no language-model head" in _dump_dom(
        tmp_path / "pages" / "sae_000000.html", tmp_path / "profile"
    )
    shot = _screenshot(page, tmp_path / "profile", tmp_path / "feature.png", 2400)
    painted = _painted_rows(shot)
    bands = painted[:2000].reshape(10, -1).any(axis=1)
    assert bands.all(), bands  # text, tables, the histogram and examples all the way down the first 2000 pixels
    assert ((shot[..., 0] > 0.8) & (shot[..., 2] < 0.3)).any()  # the orange of the density bars and shaded tokens

    overview = _dump_dom(tmp_path / "sae.html", tmp_path / "profile")
    for section in ("3 never fire", "Run metrics", "Latent density (log10 firing rate)", "L0 per token",
                    "Feature pages", 'href="pages/sae_000000.html"', "active latents"):  # fmt: skip
        assert section in overview, section
    assert '<a href="sae.html">' in _dump_dom(tmp_path / "index.html", tmp_path / "profile")
    shot = _screenshot(tmp_path / "sae.html", tmp_path / "profile", tmp_path / "sae.png", 900)
    assert _painted_rows(shot)[:600].reshape(6, -1).any(axis=1).all()
