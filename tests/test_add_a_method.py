"""docs/add-a-method.md, run: its package is installed from the page's own files, registers through the
``attnctrl.methods`` entry point, and works in every surface (info, generate --help, generate, batch, the app)
with no edit to attnctrl."""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

DOC = Path(__file__).resolve().parents[1] / "docs" / "add-a-method.md"


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The walkthrough's package, installed from the page's own files into a folder of its own: its module, and the
    distribution metadata with the entry points of its pyproject.toml (what ``pip install`` writes; built here
    without pip, so the test needs neither the network nor setuptools)."""
    import tomllib

    site = tmp_path_factory.mktemp("hot") / "site"
    files = dict(re.findall(r"<!-- file: (\S+) -->\n```\w*\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S))
    assert sorted(files) == ["attnctrl_hot/__init__.py", "pyproject.toml"]
    (site / "attnctrl_hot").mkdir(parents=True)
    (site / "attnctrl_hot" / "__init__.py").write_text(files["attnctrl_hot/__init__.py"], encoding="utf-8")
    project = tomllib.loads(files["pyproject.toml"])["project"]
    info = site / f"{project['name'].replace('-', '_')}-{project['version']}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n")
    groups = project["entry-points"]
    (info / "entry_points.txt").write_text("".join(
        f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()) for group, eps in groups.items()))
    assert groups == {"attnctrl.methods": {"hot": "attnctrl_hot:ENTRY"}}
    return site


def _attnctrl(site: Path, *args, cwd=None):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "attnctrl", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=600)


def test_the_command_line_and_job_files_know_it(site, tmp_path):
    info = json.loads(_attnctrl(site, "info", "--json").stdout)
    assert info["methods"]["hot"]["summary"] == "A temperature on the self-attention logits."
    helped = _attnctrl(site, "generate", "--method", "hot", "--help").stdout
    assert "--opt temperature=VALUE" in helped and "divides the self-attention logits" in helped
    bad = _attnctrl(site, "generate", "-m", "tiny-sd15", "-p", "a cat", "--method", "hot", "--opt", "temperature=0",
                    "-o", str(tmp_path / "bad"))
    assert bad.returncode == 1 and "temperature must be positive" in bad.stderr
    done = _attnctrl(site, "generate", "-m", "tiny-sd15", "-p", "a photo of a cat", "--steps", "2", "--seed", "0",
                     "--method", "hot", "--opt", "temperature=2", "-o", str(tmp_path / "cli"))
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads(Image.open(done.stdout.split()[-1]).text["attnctrl"])
    assert record["method"] == "hot" and record["method_options"]["temperature"] == 2.0
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"model": "tiny-sd15", "prompt": "a photo of a cat", "steps": 2, "method": "hot",
                                "options": {"temperature": 2}}) + "\n" + json.dumps(
        {"model": "tiny-sd15", "prompt": "a cat", "method": "hot", "options": {"heat": 2}}) + "\n")
    refused = _attnctrl(site, "batch", str(jobs), "-o", str(tmp_path / "out"))
    assert refused.returncode == 1 and "jobs.jsonl:2: hot has no option 'heat'" in refused.stderr
    jobs.write_text(jobs.read_text().splitlines()[0] + "\n")
    ran = _attnctrl(site, "batch", str(jobs), "-o", str(tmp_path / "out"))
    assert ran.returncode == 0, ran.stderr[-2000:]
    png = tmp_path / "out" / "00000-0-a-photo-of-a-cat.png"
    # the same request through both surfaces gives the same pixels
    np.testing.assert_array_equal(np.asarray(Image.open(png)), np.asarray(Image.open(done.stdout.split()[-1])))


def test_the_app_and_the_python_api_know_it(site, tmp_path):
    gr = pytest.importorskip("gradio")
    sys.path.insert(0, str(site))
    importlib.invalidate_caches()
    from attnctrl import methods

    try:
        methods._load_entry_points()
        from attnctrl_hot import Hot

        from attnctrl import apply, tiny_pipeline
        from attnctrl.ui import App, Settings
        from attnctrl.ui.tabs import _build_tab, _tabs

        tab = next(t for t in _tabs() if t.key == "hot")
        with gr.Blocks():
            _build_tab(tab)
        assert [name for name, _ in tab.groups] == ["temperature"]
        app = App("tiny-sd15", tmp_path / "ui")
        result = app.generate(Settings(model="tiny-sd15", prompt="a photo of a cat", steps=2), *tab.request(
            app, [2.0, ""])[:2])
        assert "hot" in result.info and len(result.images) == 1
        # temperature 1 is the stock processor: identity, and exact undo
        pipe = tiny_pipeline("sd15")
        before = dict(pipe.unet.attn_processors)
        import torch

        def run():
            return pipe("a cat", num_inference_steps=2, output_type="np",
                        generator=torch.Generator().manual_seed(0)).images

        plain = run()
        with apply(pipe, Hot(temperature=1.0)):
            same = run()
        with apply(pipe, Hot(temperature=2.0)):
            hot = run()
        np.testing.assert_allclose(same, plain, atol=1e-6)
        assert np.abs(hot - plain).max() > 1e-3
        assert all(pipe.unet.attn_processors[k] is v for k, v in before.items())
    finally:
        methods.REGISTRY.pop("hot", None)
        sys.path.remove(str(site))
