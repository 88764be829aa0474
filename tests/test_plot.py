"""nt.plot draws exactly the values it is given; the Jupyter tables show every row, escaped."""

from __future__ import annotations

from html.parser import HTMLParser

import pytest
import torch

import neurotap as nt
from conftest import tiny_llama

pytest.importorskip("matplotlib", reason="nt.plot needs matplotlib: pip install -r requirements-dev.txt")
from matplotlib.image import imread  # noqa: E402


def drawn(figure) -> torch.Tensor:
    """The numbers behind the figure's one image, as matplotlib holds them."""
    (image,) = figure.axes[0].images
    return torch.as_tensor(image.get_array().data)


def tick_labels(axis) -> list[str]:
    return [label.get_text() for label in axis.get_ticklabels()]


def assert_png(path, figure) -> None:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = imread(path)
    width, height = figure.get_size_inches() * 110
    assert pixels.shape[:2] == (round(height), round(width))


@pytest.fixture(scope="module")
def model() -> nt.Model:
    return nt.wrap(tiny_llama())


def test_attention_draws_one_heads_pattern_from_a_tensor_and_saves_a_png(tmp_path):
    pattern = torch.rand(2, 4, 5, 5).softmax(-1)
    figure = nt.plot.attention(pattern, head=3, tokens=list("abcde"), path=tmp_path / "attention.png")
    assert torch.equal(drawn(figure), pattern[0, 3])
    assert tick_labels(figure.axes[0].xaxis) == list("abcde")
    assert tick_labels(figure.axes[0].yaxis) == list("abcde")
    assert_png(tmp_path / "attention.png", figure)


def test_attention_finds_a_layers_pattern_in_recordings(model):
    ids = torch.randint(0, 100, (1, 6), generator=torch.Generator().manual_seed(0))
    point = "model.layers.1.self_attn.attention_interface.softmax"
    model.forward(ids, probes=[nt.probe(point, nt.Record())])
    recordings = {name: dict(ctx) for name, ctx in model.recordings().items()}  # clearing empties the contexts
    model.clear_recordings()
    with torch.no_grad():
        expected = model.module(ids, output_attentions=True).attentions[1][0, 2]  # the model's own, no neurotap
    torch.testing.assert_close(drawn(nt.plot.attention(recordings, 1, 2)), expected)
    _, trace = model.run(ids, record="blocks.1.attn.pattern")
    torch.testing.assert_close(drawn(nt.plot.attention(trace, 1, 2)), expected)
    with pytest.raises(nt.NeurotapError, match="no attention pattern of layer 0"):
        nt.plot.attention(recordings, 0)
    with pytest.raises(nt.NeurotapError, match="say which layer"):
        nt.plot.attention(recordings)
    with pytest.raises(nt.NeurotapError, match="out of range"):
        nt.plot.attention(recordings, 1, 9)


def test_heatmap_draws_a_tensor_and_saves_a_png(tmp_path):
    values = torch.randn(3, 4)
    figure = nt.plot.heatmap(values, path=tmp_path / "map.png")
    assert torch.equal(drawn(figure), values)
    assert_png(tmp_path / "map.png", figure)
    low, high = figure.axes[0].images[0].get_clim()
    assert low == -high == -values.abs().max().item(), "signed values are centred on zero"
    with pytest.raises(nt.NeurotapError, match="2-D"):
        nt.plot.heatmap(torch.zeros(2, 3, 4))
    with pytest.raises(nt.NeurotapError, match="labels for 3 rows"):
        nt.plot.heatmap(values, rows=["one"])


def test_heatmap_of_an_activation_patching_result_labels_layers_and_tokens(model):
    clean, corrupt = torch.tensor([[5, 9, 17, 33, 2]]), torch.tensor([[5, 9, 40, 33, 2]])
    result = nt.experiments.activation_patching(model, clean, corrupt, nt.LogitDiff(3, 4), "blocks.*.resid_post")
    figure = nt.plot.heatmap(result)
    assert torch.equal(drawn(figure), result.values)
    assert tick_labels(figure.axes[0].yaxis) == list(result.points)
    assert tick_labels(figure.axes[0].xaxis) == [repr(t)[1:-1] for t in result.tokens]
    assert figure.axes[0].get_title() == f"{result.experiment} {result.metric}"


def test_logit_lens_draws_each_cells_top_token_and_probability(model, tmp_path):
    ids = torch.randint(0, 100, (1, 5), generator=torch.Generator().manual_seed(1))
    residuals = {}
    layers = model.module.model.layers
    handles = [
        layer.register_forward_hook(lambda m, a, out, i=i: residuals.setdefault(i, out))
        for i, layer in enumerate(layers)
    ]
    with torch.no_grad():
        model.module(ids)
        probs = torch.stack(
            [model.module.lm_head(model.module.model.norm(residuals[i]))[0] for i in range(len(layers))]
        ).softmax(-1)
    for handle in handles:
        handle.remove()
    best, found = probs.topk(2, dim=-1)
    pieces = [f"t{int(i)}" for i in ids[0]]
    lens = {  # the JSON POST /v1/logit_lens answers
        "ids": ids[0].tolist(),
        "pieces": pieces,
        "positions": list(range(5)),
        "layers": [
            {
                "layer": i,
                "ids": found[i].tolist(),
                "probs": best[i].tolist(),
                "pieces": [[f"w{int(t)}" for t in cell] for cell in found[i]],
            }
            for i in range(len(layers))
        ],
    }
    figure = nt.plot.logit_lens(lens, path=tmp_path / "lens.png")
    torch.testing.assert_close(drawn(figure), best[..., 0])
    texts = {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text() for t in figure.axes[0].texts}
    assert texts == {(i, j): f"w{int(found[i, j, 0])}" for i in range(len(layers)) for j in range(5)}
    assert tick_labels(figure.axes[0].xaxis) == pieces
    assert_png(tmp_path / "lens.png", figure)
    lens = model.logit_lens(ids, None, top=2)
    figure = nt.plot.logit_lens(lens)
    torch.testing.assert_close(drawn(figure), best[..., 0])
    assert lens.top_ids[..., 0].tolist() == found[..., 0].tolist()
    texts = {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text() for t in figure.axes[0].texts}
    assert texts == {(i, j): repr(lens.top_tokens[i][j][0])[1:-1] for i in range(len(layers)) for j in range(5)}
    with pytest.raises(nt.NeurotapError, match="logit lens result"):
        nt.plot.logit_lens(torch.zeros(2, 2))


class Cells(HTMLParser):
    """The text of every cell of an HTML table, row by row."""

    def __init__(self, markup: str) -> None:
        super().__init__()
        self.rows: list[list[str]] = []
        self.feed(markup)

    def handle_starttag(self, tag, attrs):
        if tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self.rows[-1].append("")

    def handle_data(self, data):
        if self.rows and self.rows[-1]:
            self.rows[-1][-1] += data


def test_points_recordings_and_save_contexts_show_as_escaped_tables(model):
    listing = model.points("model.layers.0.mlp")
    rows = Cells(listing._repr_html_()).rows
    assert rows[0] == ["name", "kind", "shape", "dtype", "source"]
    assert rows[1:] == [[p.name, p.kind, str(p.shape), p.dtype or "", p.source] for p in listing]

    def note(ctx, value):
        ctx.note = "<script>alert(1)</script>"

    ids = torch.randint(0, 100, (1, 4), generator=torch.Generator().manual_seed(2))
    model.forward(ids, probes=[nt.probe("model.layers.0.mlp.mul", nt.Record()), nt.probe("lm_head.output", note)])
    recordings = model.recordings()
    markup = recordings._repr_html_()
    assert "<script>" not in markup and "&lt;script&gt;" in markup
    rows = Cells(markup).rows
    assert rows[1:] == [
        [
            "model.layers.0.mlp.mul",
            "record",
            f"list of 1: float32 {tuple(recordings['model.layers.0.mlp.mul'].record[0].shape)}",
        ],
        ["lm_head.output", "note", repr("<script>alert(1)</script>")],
    ]
    markup = recordings["lm_head.output"]._repr_html_()
    assert markup.startswith("<b>lm_head.output</b>")
    assert Cells(markup).rows == [["key", "value"], ["note", repr("<script>alert(1)</script>")]]
    model.clear_recordings()


def test_a_trace_shows_as_a_table_of_its_points(model):
    ids = torch.randint(0, 100, (1, 4), generator=torch.Generator().manual_seed(3))
    _, trace = model.run(ids, record=["blocks.0.resid_post", "blocks.1.resid_post"])
    rows = Cells(trace._repr_html_()).rows
    names = ("blocks.0.resid_post", "blocks.1.resid_post")
    assert rows[1:] == [["value", name, "1", f"float32 {tuple(trace[name].shape)}"] for name in names]
