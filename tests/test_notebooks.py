"""The quick-start notebook runs end to end in a real Jupyter kernel (nbclient + ipykernel).

The parameters cell (tagged `parameters`) is followed by an injected cell that shrinks the run
(papermill's convention, without papermill): 3 steps of a 2-block DiT, 5 sampling steps.
"""
import base64
import io
import json
import pathlib

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOKS = pathlib.Path(__file__).resolve().parent.parent / "notebooks"
QUICKSTART = NOTEBOOKS / "quickstart.ipynb"
DATA = pathlib.Path(__file__).resolve().parent / "data"


def _inject_parameters(nb, source: str):
    """Inserts a code cell after the cell tagged `parameters` (papermill's injected cell)."""
    index = next(i for i, c in enumerate(nb.cells)
                 if "parameters" in c.get("metadata", {}).get("tags", []))
    cell = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
    nb.cells.insert(index + 1, cell)


def test_committed_notebooks_have_no_outputs():
    for path in NOTEBOOKS.glob("*.ipynb"):
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, \
                    f"{path.name}: clear the outputs before committing"


def test_quickstart_runs_end_to_end(tmp_path, monkeypatch):
    nb = nbformat.read(QUICKSTART, as_version=4)
    workdir = tmp_path / "run"
    _inject_parameters(nb, f"""
STEPS = 3
BATCH = 16
MODEL = dict(hidden_size=32, depth=2, num_heads=2)
SAMPLE_STEPS = 5
WORKDIR = {str(workdir)!r}
""")
    # The kernel inherits this environment: CPU only, no accelerator probing.
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute()  # raises CellExecutionError on the first failing cell

    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if o.output_type == "error"]
    assert not errors, errors
    grid = workdir / "samples" / "step000003-ddim5-cfg3" / "grid.png"
    assert grid.exists()
    from PIL import Image
    with Image.open(grid) as im:
        # 10 rows (classes) of 8 samples of 16x16, 2 px padding: 8*18+2 by 10*18+2.
        assert im.size == (146, 182), im.size
    # The grid and the loss curve are displayed inline as PNGs.
    pngs = [o["data"]["image/png"] for c in nb.cells if c.cell_type == "code"
            for o in c.outputs if o.output_type == "display_data" and "image/png" in o["data"]]
    assert len(pngs) == 2, [c.outputs for c in nb.cells if c.cell_type == "code"]
    with Image.open(io.BytesIO(base64.b64decode(pngs[0]))) as im:
        assert im.size == (146 * 3, 182 * 3)
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                   for o in c.outputs if o.output_type == "stream")
    assert "3 steps" in text and "loss " in text, text
    assert (workdir / "metrics.jsonl").exists()


def test_engine_notebook_shows_identical_samples(tmp_path, monkeypatch):
    nb = nbformat.read(NOTEBOOKS / "dynamic_engine.ipynb", as_version=4)
    _inject_parameters(nb, f"""
WORKDIR = {str(tmp_path / 'none')!r}
CONFIG = {str(NOTEBOOKS.parent / 'configs' / 'digits_dydit.py')!r}
SAMPLE_STEPS = 5
PER_CLASS = 1
TINY = dict(hidden_size=32, depth=2, num_heads=4)
""")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                   for o in c.outputs if o.output_type == "stream")
    diff = float(text.split("max |masked - gathered| =")[1].split()[0])
    assert diff <= 1e-5, text
    assert "random DyDiT" in text and "executables compiled by the engine: 1" in text, text
    pngs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
            if o.output_type == "display_data" and "image/png" in o["data"]]
    assert len(pngs) == 3  # heat map, masked grid, gathered grid


def test_pretrained_runs_on_standins(tmp_path, monkeypatch):
    """The pretrained notebook end to end with DYDIT_PRETRAINED_STANDINS: the golden tiny DiT,
    DyDiT and diffusers VAE (latent 4 channels, downsampling 2) stand in for DiT-XL/2, DyDiT-XL
    and sd-vae-ft-ema under the file names the download cell asks for; no network."""
    standins = tmp_path / "standins"
    (standins / "sd-vae-ft-ema").mkdir(parents=True)
    (standins / "DiT-XL-2-256x256.pt").symlink_to(DATA / "dit_s" / "model.pt")
    (standins / "DyDiT-XL-2.pt").symlink_to(DATA / "dydit_s" / "model.pt")
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        (standins / "sd-vae-ft-ema" / name).symlink_to(DATA / "vae" / name)
    out = tmp_path / "out"
    nb = nbformat.read(NOTEBOOKS / "pretrained.ipynb", as_version=4)
    _inject_parameters(nb, f"""
MODEL_NAME = "DiT-S/2"
MODEL_KWARGS = dict(hidden_size=64, depth=2, num_heads=4)  # tests/data/dit_s/config.json
IMAGE_SIZE = 16      # latent 8x8x4 through the tiny VAE
NUM_CLASSES = 10
CLASSES = [1, 3]
PER_CLASS = 2
SAMPLE_STEPS = 3
MASKED = True
DYDIT_CHECKPOINT = "https://example.invalid/DyDiT-XL-2.pt"
DOWNLOAD_DIR = {str(tmp_path / 'downloads')!r}
OUT_DIR = {str(out)!r}
""")
    monkeypatch.setenv("DYDIT_PRETRAINED_STANDINS", str(standins))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert not (tmp_path / "downloads").exists()  # everything came from the stand-ins
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    for row in ("static DiT-S/2", "DyDiT masked", "DyDiT engine"):
        assert any(line.startswith(row) for line in text.splitlines()), text
    assert float(text.split("max |masked - engine| over the latents:")[1].split()[0]) <= 1e-5

    from PIL import Image
    for name in ("static", "masked", "engine"):
        with Image.open(out / f"{name}.png") as im:
            assert im.size == (38, 38), im.size  # 2 x 2 images of 16 px, 2 px padding
    timings = json.loads((out / "timings.json").read_text())
    assert set(timings) == {"static", "masked", "engine"}
    assert timings["masked"]["flops_ratio"] == 1.0 > timings["engine"]["flops_ratio"] > 0
    assert all(t["compile_s"] > 0 and t["images_per_s"] > 0 for t in timings.values())
    pngs = [o for o in outputs if o.output_type == "display_data" and "image/png" in o["data"]]
    assert len(pngs) == 1  # the three grids side by side
