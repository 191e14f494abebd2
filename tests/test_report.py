"""The report: its JSON, its HTML page and its figures.

Every number shown is in report.json (valid against the shipped schema), and index.html is a
self-contained page with a header, sections, tables and every figure.
"""

import contextlib
import io
import json
import re
import shutil
import subprocess
import sys
import textwrap

import jsonschema
import numpy as np
import pytest
from _reference import assert_rel_close

from lowrank import circuits, interpret, report, sharding
from lowrank.cli import main
from lowrank.models import load_pretrained


@pytest.fixture(scope="module")
def model():
    return load_pretrained()


@pytest.fixture(scope="module")
def written(model, tmp_path_factory):
    results = report.analyse(model, name="induction-2l", top_heads=2)
    out = tmp_path_factory.mktemp("report")
    meta = report.provenance("python -m lowrank report --out x")
    data = report.write_files(results, out, meta=meta)
    return results, data, out


def test_report_json_follows_its_schema(written):
    _, data, out = written
    schema = json.loads(report.SCHEMA_PATH.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk == data
    jsonschema.validate(on_disk, schema, cls=jsonschema.Draft202012Validator)


def test_report_json_holds_every_number_shown(written, model):
    results, data, _ = written
    c = model.config
    for kind in "QKV":
        assert_rel_close(
            data["composition"]["scores"][kind], circuits.composition_scores(model, kind)
        )
    eig = np.asarray(data["full_ov_eigenvalues"]["real"]) + 1j * np.asarray(
        data["full_ov_eigenvalues"]["imag"]
    )
    assert eig.shape == (c.n_layers, c.n_heads, c.d_head)
    assert_rel_close(eig.sum(-1).real / np.abs(eig).sum(-1), data["copying_scores"]["full_ov"])
    spectra = interpret.embedding_spectra(model)
    for name, values in spectra.items():
        assert_rel_close(data["embedding_spectra"][name], values, what=name)
    drawn = data["positional_qk"]
    assert len(drawn["heads"]) == len(drawn["scores"]) == c.n_layers * c.n_heads  # 8: all drawn
    full = np.asarray(circuits.positional_qk_circuit(model).AB)
    n = drawn["positions"]
    assert_rel_close(drawn["scores"][5], full[1, 1, :n, :n])
    vectors = np.asarray(data["w_pos"]["top_singular_vectors"])
    assert vectors.shape == (6, c.n_ctx)
    assert results.rotary is None
    assert data["relative_position_profile"] is None and data["rotary_positional_qk"] is None
    # every figure is listed with a section of the page
    assert {f["section"] for f in data["figures"].values()} <= {s[0] for s in report.SECTIONS}


def test_strict_json_turns_nan_into_null():
    text = report.dumps({"a": [1.0, float("nan")], "b": {"c": float("inf")}})
    assert json.loads(text) == {"a": [1.0, None], "b": {"c": None}}
    assert "NaN" not in text and "Infinity" not in text


# A report of one layer of two heads, built by hand: to_json must turn it into JSON (valid
# against the schema) without importing matplotlib, which only drawing the figures needs.
TINY_REPORT_TO_JSON = """
import json, sys
import numpy as np
from lowrank import report
from lowrank.models import ModelConfig

config = ModelConfig("GPT2LMHeadModel", 1, 2, 8, 4, 32, 10, 6)
results = report.Results(
    model="tiny",
    config=config,
    full_ov_eigenvalues=np.full((1, 2, 4), 1 + 1j),
    full_ov_copying=np.array([[1.0, np.nan]]),
    ov_copying=np.array([[0.5, -0.5]]),
    composition={kind: np.zeros((1, 2, 1, 2)) for kind in "QKV"},
    baseline=8**-0.5,
    embedding_spectra={"W_E": np.array([2.0, 1.0])},
    interpreted=(report.InterpretedHead(0, 1, 1.0, 2.0, ("a",), ("b",)),),
    positions=report.LearnedPositions(
        vectors=np.eye(6)[:, :4],
        singular_values=np.array([3.0, 2.0, 1.0, 0.0]),
        effective_rank=3,
        qk=np.zeros((1, 2, 6, 6)),
        heads=((0, 0), (0, 1)),
    ),
)
data = json.loads(report.dumps(report.to_json(results)))
print(json.dumps({"report": data, "matplotlib": "matplotlib" in sys.modules}))
"""


def test_to_json_needs_no_matplotlib():
    run = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(TINY_REPORT_TO_JSON)],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = json.loads(run.stdout)
    assert not out["matplotlib"], "report.to_json imported matplotlib"
    data = out["report"]
    jsonschema.validate(data, json.loads(report.SCHEMA_PATH.read_text()))
    assert data["copying_scores"]["full_ov"] == [[1.0, None]]
    assert "composition_K.png" in data["figures"]


def test_page_is_self_contained_with_header_sections_tables_and_figures(written):
    _, data, out = written
    page = (out / "index.html").read_text()
    for fact in ("induction-2l", "GPT2LMHeadModel", "0.1.0", "jax", "cpu", "UTC"):
        assert fact in page, fact
    assert "python -m lowrank report --out x" in page
    for key, heading, _ in report.SECTIONS:
        if key != "rotary":  # learned positions: the W_pos sections instead
            assert f'id="{key}"' in page and f"<h2>{heading}</h2>" in page
    assert 'id="rotary"' not in page
    assert page.count("<table") >= 5
    assert "<pre>" not in page
    for name in data["figures"]:
        assert f'src="{name}"' in page and (out / name).is_file()
    # no scripts, no fonts or styles from the network
    assert "<script" not in page
    assert not re.search(r"(src|href)=\"(https?:)?//", page)


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Chromium (apt: chromium)")
def test_page_renders_in_headless_chromium(written, tmp_path):
    _, _, out = written
    shot = tmp_path / "page.png"
    subprocess.run(
        [
            "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--window-size=1400,2000",
            f"--screenshot={shot}",
            (out / "index.html").as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    from matplotlib.image import imread

    pixels = imread(shot)
    assert pixels.shape[:2] == (2000, 1400)
    assert pixels[:80].mean() < 0.4  # the dark header band
    assert pixels.std() > 0.1  # content, not a blank page


LEARNED_FIGURES = {
    "copying_full_ov.png",
    "copying_ov.png",
    "eigenvalues_full_ov.png",
    "composition_Q.png",
    "composition_K.png",
    "composition_V.png",
    "embedding_spectra.png",
    "w_pos_singular_vectors.png",
    "positional_qk.png",
}
ROTARY_FIGURES = {"rotary_profile.png", "rotary_positional_qk.png"}


def test_learned_model_figures_are_unchanged(written):
    _, data, out = written
    assert set(data["figures"]) == LEARNED_FIGURES
    assert {p.name for p in out.glob("*.png")} == LEARNED_FIGURES


def test_rotary_models_report_without_w_pos(rotary_checkpoint, tmp_path):
    """``python -m lowrank report DIR`` of a Llama-style model (rotary, grouped K/V).

    No W_pos: no W_pos figures or positional section, null w_pos and positional_qk in a
    schema-valid report.json, the rotary section instead; the rest as for learned positions.
    """
    path = rotary_checkpoint("llama").path
    assert main(["report", str(path), "--top-heads", "2", "--quiet", "--out", str(tmp_path)]) == 0
    model = load_pretrained(path)
    data = json.loads((tmp_path / "report.json").read_text())
    jsonschema.validate(data, json.loads(report.SCHEMA_PATH.read_text()))
    assert data["w_pos"] is None and data["positional_qk"] is None
    assert set(data["embedding_spectra"]) == {"W_E", "W_U"}
    assert_rel_close(data["embedding_spectra"]["W_U"], interpret.embedding_spectra(model)["W_U"])
    assert_rel_close(data["composition"]["scores"]["K"], circuits.composition_scores(model, "K"))
    assert {"w_pos_singular_vectors.png", "positional_qk.png"}.isdisjoint(data["figures"])
    assert ROTARY_FIGURES <= set(data["figures"])
    assert sorted(p.name for p in tmp_path.glob("*.png")) == sorted(data["figures"])
    n = min(report.POSITIONS_SHOWN, model.config.n_ctx)
    assert_rel_close(
        data["relative_position_profile"]["scores"],
        circuits.relative_position_profile(model, np.arange(n)),
    )
    page = (tmp_path / "index.html").read_text()
    assert 'id="positional"' not in page and "positions are rotary" in page
    assert 'id="rotary"' in page
    assert "positions are rotary" in report.format_tables(data)


ROPE = "induction-2l-rope"


@pytest.fixture(scope="module")
def rope_run(tmp_path_factory):
    """``python -m lowrank report induction-2l-rope --out DIR`` (in process): its stdout, DIR."""
    out = tmp_path_factory.mktemp("rope")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(["report", ROPE, "--out", str(out)]) == 0
    return stdout.getvalue(), out


@pytest.fixture(scope="module")
def rope_model():
    return load_pretrained(ROPE)


def _null_to_nan(values):
    return np.asarray(values, dtype=np.float64)  # None -> nan


def test_rotary_report_writes_every_figure(rope_run):
    _, out = rope_run
    data = json.loads((out / "report.json").read_text())
    jsonschema.validate(data, json.loads(report.SCHEMA_PATH.read_text()))
    assert ROTARY_FIGURES <= set(data["figures"])
    assert {"w_pos_singular_vectors.png", "positional_qk.png"}.isdisjoint(data["figures"])
    assert {data["figures"][name]["section"] for name in ROTARY_FIGURES} == {"rotary"}
    for name in data["figures"]:
        assert (out / name).stat().st_size > 1000, name
    assert {p.name for p in out.glob("*.png")} == set(data["figures"])
    page = (out / "index.html").read_text()
    assert 'id="rotary"' in page and 'id="positional"' not in page
    for name in ROTARY_FIGURES:
        assert f'src="{name}"' in page


def test_rotary_report_numbers_are_the_circuits_numbers(rope_run, rope_model):
    _, out = rope_run
    data = json.loads((out / "report.json").read_text())
    c = rope_model.config
    n = min(report.POSITIONS_SHOWN, c.n_ctx)
    profile = data["relative_position_profile"]
    assert profile["offsets"] == list(range(n))
    expected = np.asarray(circuits.relative_position_profile(rope_model, np.arange(n)))
    assert_rel_close(profile["scores"], expected)
    assert profile["peak_offsets"] == expected.argmax(-1).tolist()
    drawn = data["rotary_positional_qk"]
    assert drawn["positions"] == n
    assert drawn["heads"] == [f"L{la}H{h}" for la in range(c.n_layers) for h in range(c.n_heads)]
    pattern = np.asarray(circuits.rotary_positional_pattern(rope_model, n))
    got = _null_to_nan(drawn["scores"]).reshape(pattern.shape)
    assert np.array_equal(np.isnan(got), np.isneginf(pattern))  # -inf (no score) -> null
    assert_rel_close(np.nan_to_num(got), np.where(np.isfinite(pattern), pattern, 0.0))
    assert data["w_pos"] is None and data["positional_qk"] is None


def test_previous_token_head_peaks_at_offset_one(rope_run):
    stdout, out = rope_run
    data = json.loads((out / "report.json").read_text())
    assert data["relative_position_profile"]["peak_offsets"][0][3] == 1
    assert "largest relative-position score" in stdout
    assert re.search(r"L0 +(\d+ +){3}1\n", stdout), stdout


def test_rotary_sections_under_a_mesh(rope_model, rope_run):
    """``analyse(model, mesh=...)`` gives the rotary numbers of the unsharded report."""
    _, out = rope_run
    data = json.loads((out / "report.json").read_text())
    mesh = sharding.make_mesh(rope_model.config.n_layers, rope_model.config.n_heads)
    got = report.analyse(sharding.shard_model(rope_model, mesh), name=ROPE, mesh=mesh).rotary
    assert got is not None
    assert got.offsets.tolist() == data["relative_position_profile"]["offsets"]
    assert_rel_close(got.profile, data["relative_position_profile"]["scores"])
    drawn = data["rotary_positional_qk"]
    assert [f"L{la}H{h}" for la, h in got.heads] == drawn["heads"]
    want = _null_to_nan(drawn["scores"]).reshape(got.pattern.shape)
    assert np.array_equal(np.isneginf(got.pattern), np.isnan(want))
    finite = np.isfinite(got.pattern)
    assert_rel_close(got.pattern[finite], want[finite])


def test_many_layers_draw_the_profiles_as_a_heatmap():
    """Over ``PROFILE_LINES_MAX`` layers the profiles are one image (rows: heads)."""
    from lowrank import plot

    profile = np.random.default_rng(0).normal(size=(plot.PROFILE_LINES_MAX + 2, 3, 16))
    figure = plot.relative_position_profiles(profile, title="profiles")
    (ax, _) = figure.axes  # the image and its colour bar
    assert ax.images[0].get_array().shape == (profile.shape[0] * 3, 16)
    lines = plot.relative_position_profiles(profile[:2], title="profiles")
    assert len(lines.axes[0].lines) == 3 + 1  # a curve per head and the zero line
