"""A corpus of bad inputs, as a hostile new user types them, over ``attnctrl generate`` and ``attnctrl batch``.

Every case must end with a non-zero exit, exactly one line starting ``Error:``, no traceback and no file left
behind. The cases cover every input kind of every method, the common settings, the model and the device; the
batch cases run twice, with and without ``--dry-run`` (a bad job file is refused before anything runs). Most cases
are refused before any model loads; the few that need the model (its family, its native size, a LoRA's keys) use
``tiny-*`` models, loaded once per module.
"""

from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from attnctrl.cli.main import cli

generate_module = importlib.import_module("attnctrl.run.generate")  # the package exports generate() by that name
batch_module = importlib.import_module("attnctrl.run.batch")

EXAMPLES = Path(__file__).resolve().parent.parent / "assets" / "examples"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    Image.new("RGB", (64, 64), (200, 10, 10)).save(d / "img.png")
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    Image.fromarray(mask).save(d / "mask.png")
    Image.fromarray(np.full((32, 32), 255, np.uint8)).save(d / "mask32.png")
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(d / "black.png")
    (d / "text.png").write_text("not an image")
    (d / "notlora.safetensors").write_text("not a LoRA")
    (d / "folder").mkdir()
    Image.new("RGB", (64, 64)).save(d / "truncated.png")
    (d / "truncated.png").write_bytes((d / "truncated.png").read_bytes()[:60])
    from safetensors.torch import save_file

    save_file({"down_blocks.0.lora_A.weight": torch.full((4, 8), float("nan")),
               "down_blocks.0.lora_B.weight": torch.zeros(8, 4)}, d / "nan.safetensors")
    save_file({"some.weight": torch.zeros(2, 2)}, d / "nolora.safetensors")
    shutil.copy(EXAMPLES / "toyworld-sks-lora.safetensors", d / "sks.safetensors")
    return d


@pytest.fixture(scope="module", autouse=True)
def one_load_per_model():
    """Each model is loaded once for the module (the cases that need a model share it)."""
    original, cache = generate_module.load, {}

    def load(plan):
        key = (plan.request.model, plan.request.dtype, plan.request.device)
        if key not in cache:
            cache[key] = original(plan)
        return cache[key]

    mp = pytest.MonkeyPatch()
    mp.setattr(generate_module, "load", load)
    mp.setattr(batch_module, "load", load)
    yield
    mp.undo()


M = ["-m", "tiny-sd15", "--steps", "1"]
FC = [*M, "--method", "freecustom", "-p", "a circle"]
MF = [*M, "--method", "magicface", "-p", "a circle and a square"]
IR = [*M, "--method", "irdiffusion", "-p", "a star and a square"]
CL = [*M, "--method", "clora", "-p", "a square"]
PC = ["-m", "tiny-sd15", "--steps", "2", "--method", "primecomposer", "-p", "a circle"]
SQ = "--subject", "square=a square@0.5,0,1,1"
LORA = "{sks}:sks square:a sks square"
COMP = "{img}:{img}:{mask}@8,8,16,16"

GENERATE = {
    # prompts and settings
    "no-prompt": [*M],
    "prompt-empty": [*M, "-p", ""],
    "prompt-blank": [*M, "-p", "   "],
    "prompt-surrogate": [*M, "-p", "a cat \udcff"],
    "negative-surrogate": [*M, "-p", "a cat", "-n", "\udcff"],
    "seed-negative": [*M, "-p", "a cat", "--seed", "-1"],
    "seed-2^32": [*M, "-p", "a cat", "--seed", "4294967296"],
    "seed-2^70": [*M, "-p", "a cat", "--seed", str(2**70)],
    "seed-text": [*M, "-p", "a cat", "--seed", "abc"],
    "seed-range-overflow": [*M, "-p", "a cat", "--seed", "4294967295", "--num-images", "2"],
    "steps-0": [*M, "-p", "a cat", "--steps", "0"],
    "steps-text": [*M, "-p", "a cat", "--steps", "many"],
    "guidance-nan": [*M, "-p", "a cat", "--guidance", "nan"],
    "guidance-inf": [*M, "-p", "a cat", "--guidance", "inf"],
    "guidance-negative": [*M, "-p", "a cat", "--guidance", "-1"],
    "width-not-multiple": [*M, "-p", "a cat", "--width", "100"],
    "height-zero": [*M, "-p", "a cat", "--height", "0"],
    "size-beyond-the-model": [*M, "-p", "a cat", "--width", "8192", "--height", "8192"],
    "num-images-0": [*M, "-p", "a cat", "--num-images", "0"],
    "frames-on-an-image-model": [*M, "-p", "a cat", "--num-frames", "5"],
    "device-banana": [*M, "-p", "a cat", "--device", "banana"],
    "device-cuda-without-gpu": [*M, "-p", "a cat", "--device", "cuda"],
    "device-cuda-7": [*M, "-p", "a cat", "--device", "cuda:7"],
    "dtype-banana": [*M, "-p", "a cat", "--dtype", "fp7"],
    "offload-unknown": [*M, "-p", "a cat", "--offload", "half"],
    "offload-on-the-cpu": [*M, "-p", "a cat", "--device", "cpu", "--offload", "model"],
    "attention-backend-unknown": [*M, "-p", "a cat", "--attention-backend", "fast"],
    "attention-backend-gpu-only-on-the-cpu": [*M, "-p", "a cat", "--device", "cpu", "--attention-backend", "flash"],
    "model-not-cached": ["-m", "nobody/nothing", "-p", "a cat"],
    "model-folder-not-a-pipeline": ["-m", "{folder}", "-p", "a cat"],
    "model-text-file": ["-m", "{text}", "-p", "a cat"],
    "model-unknown-tiny": ["-m", "tiny-sd99", "-p", "a cat"],
    "output-is-a-file": [*M, "-p", "a cat", "-o", "{text}"],
    "from-missing-file": ["--from", "{folder}/none.png"],
    "from-file-without-settings": ["--from", "{img}"],
    "from-text-file": ["--from", "{text}"],
    # methods and options
    "method-unknown": [*M, "-p", "a cat", "--method", "nosuch"],
    "opt-without-method": [*M, "-p", "a cat", "--opt", "ratio=0.5"],
    "opt-without-equals": [*M, "-p", "a cat", "--method", "agent", "--opt", "ratio"],
    "opt-unknown": [*M, "-p", "a cat", "--method", "agent", "--opt", "nonsense=1"],
    "opt-not-a-number": [*M, "-p", "a cat", "--method", "agent", "--opt", "ratio=abc"],
    "opt-out-of-range": [*M, "-p", "a cat", "--method", "agent", "--opt", "ratio=2"],
    "opt-broken-json": [*FC, "--ref", "{img}:{mask}:a circle", "--opt", "mask_weights=[1,"],
    "old-flag": [*M, "-p", "a cat", "--method", "agent", "--ratio", "0.5"],
    "layers-select-nothing": [*M, "-p", "a cat", "--method", "agent", "--opt", "layers=res==999"],
    "method-on-unsupported-family": [*M, "-p", "a cat", "--method", "clear"],
    "video-method-on-image-model": [*M, "--method", "ditctrl", "-p", "a cat", "-p", "a dog"],
    "two-prompts-without-multi-prompt-method": [*M, "-p", "a cat", "-p", "a dog"],
    "input-for-plain-generation": [*M, "-p", "a cat", "--ref", "{img}"],
    "input-of-another-method": [*FC, "--ref", "{img}:{mask}:a circle", *SQ],
    "maps-word-absent": [*M, "-p", "a cat", "--method", "attention_maps", "--opt", "words=dog"],
    "maps-no-words": [*M, "-p", "a cat", "--method", "attention-maps", "--opt", "words="],
    "maps-no-words-at-all": [*M, "-p", "a cat", "--method", "attention-maps"],
    "ditctrl-one-prompt": ["-m", "tiny-cogvideox", "--method", "ditctrl", "-p", "a cat"],
    "ditctrl-subject-words-count": ["-m", "tiny-cogvideox", "--method", "ditctrl", "-p", "a cat", "-p", "a dog",
                                    "-p", "a cow", "--opt", "subject_words=cat,dog"],
    "ditctrl-subject-word-absent": ["-m", "tiny-cogvideox", "--method", "ditctrl", "-p", "a cat", "-p", "a dog",
                                    "--opt", "subject_words=cat,horse"],
    # references (FreeCustom, MagicFace)
    "fc-no-reference": [*FC],
    "fc-reference-missing": [*FC, "--ref", "{folder}/missing.png"],
    "fc-reference-text-as-png": [*FC, "--ref", "{text}:{mask}:a circle"],
    "fc-reference-truncated-png": [*FC, "--ref", "{truncated}:{mask}:a circle"],
    "fc-reference-folder": [*FC, "--ref", "{folder}"],
    "fc-reference-empty-spec": [*FC, "--ref", ""],
    "fc-mask-wrong-size": [*FC, "--ref", "{img}:{mask32}:a circle"],
    "fc-mask-empty": [*FC, "--ref", "{img}:{black}:a circle"],
    "fc-mask-text": [*FC, "--ref", "{img}:{text}:a circle"],
    "fc-mask-weights-count": [*FC, "--ref", "{img}:{mask}:a circle", "--opt", "mask_weights=1,2,3"],
    "fc-reference-prompt-surrogate": [*FC, "--ref", "{img}:{mask}:a \udcff"],
    "mf-no-reference": [*MF, "--opt", "ref_words=circle"],
    "mf-ref-words-count": [*MF, "--ref", "{img}:{mask}:a circle", "--opt", "ref_words=circle,square"],
    "mf-ref-word-absent": [*MF, "--ref", "{img}:{mask}:a circle", "--opt", "ref_words=triangle"],
    # subjects (IR-Diffusion)
    "ir-no-subject": [*IR],
    "ir-subject-without-equals": [*IR, "--subject", "star"],
    "ir-subject-empty-word": [*IR, "--subject", "=a star", *SQ],
    "ir-subject-word-absent": [*IR, "--subject", "moon=a moon@0,0,0.5,1", *SQ],
    "ir-subject-image-missing": [*IR, "--subject", "star={folder}/missing.png::a star", *SQ],
    "ir-subject-image-text": [*IR, "--subject", "star={text}:{mask}:a star", *SQ],
    "ir-region-inverted": [*IR, "--subject", "star=a star@0.5,0,0.1,1", *SQ],
    "ir-region-negative": [*IR, "--subject", "star=a star@-1,0,0.5,1", *SQ],
    "ir-region-nan": [*IR, "--subject", "star=a star@nan,0,1,1", *SQ],
    "ir-region-not-numbers": [*IR, "--subject", "star=a star@a,b,c,d", *SQ],
    "ir-region-mask-text": [*IR, "--subject", "star=a star@{text}", *SQ],
    "ir-region-mask-empty": [*IR, "--subject", "star=a star@{black}", *SQ],
    "ir-two-regions": [*IR, "--subject", "star=a star@0,0,1,1@0,0,1,1", *SQ],
    "ir-reference-prompt-lacks-word": [*IR, "--subject", "star=a moon@0,0,0.5,1", *SQ],
    # LoRAs (CLoRA)
    "clora-no-lora": [*CL],
    "clora-spec-incomplete": [*CL, "--lora", "{sks}:sks square"],
    "clora-file-missing": [*CL, "--lora", "{folder}/none.safetensors:sks square:a sks square"],
    "clora-text-file": [*CL, "--lora", "{notlora}:sks square:a sks square"],
    "clora-image-as-lora": [*CL, "--lora", "{img}:sks square:a sks square"],
    "clora-nan-weights": [*CL, "--lora", "{nan}:sks square:a sks square"],
    "clora-no-lora-keys": [*CL, "--lora", "{nolora}:sks square:a sks square"],
    "clora-words-not-in-branch-prompt": [*CL, "--lora", "{sks}:sks square:a star"],
    "clora-lora-of-another-model": [*CL, "--lora", LORA],
    "clora-layers-option": [*CL, "--lora", LORA, "--opt", "layers=all"],
    # composition (PrimeComposer)
    "pc-no-composition": [*PC],
    "pc-no-box": [*PC, "--composition", "{img}:{img}"],
    "pc-box-zero": [*PC, "--composition", "{img}:{img}@0,0,0,5"],
    "pc-box-negative-size": [*PC, "--composition", "{img}:{img}@40,40,-20,-20"],
    "pc-box-outside": [*PC, "--composition", "{img}:{img}@100,100,10,10"],
    "pc-box-nan": [*PC, "--composition", "{img}:{img}@nan,0,10,10"],
    "pc-box-three-numbers": [*PC, "--composition", "{img}:{img}@0,0,10"],
    "pc-background-text": [*PC, "--composition", "{text}:{img}@0,0,10,10"],
    "pc-object-text": [*PC, "--composition", "{img}:{text}@0,0,10,10"],
    "pc-mask-wrong-size": [*PC, "--composition", "{img}:{img}:{mask32}@0,0,10,10"],
    "pc-mask-empty": [*PC, "--composition", "{img}:{img}:{black}@0,0,10,10"],
    "pc-two-compositions": [*PC, "--composition", COMP, "--composition", COMP],
    "pc-rca-word-absent": [*PC, "--composition", COMP, "--opt", "rca_words=dog"],
    "pc-domain-unknown": [*PC, "--composition", COMP, "--opt", "domain=banana"],
}


def _job(**kw):
    return {"prompt": "a cat", "model": "tiny-sd15", "steps": 1, **kw}


REF = {"image": "{img}", "mask": "{mask}", "prompt": "a circle"}
BATCH = {
    "job-invalid-json": ['{"prompt": "a cat",'],
    "job-not-an-object": ["[1, 2]"],
    "job-unknown-key": [_job(guidnace=3)],
    "job-no-prompt": [{"model": "tiny-sd15"}],
    "job-empty-prompt": [_job(prompt="")],
    "job-prompt-not-text": [_job(prompt=5)],
    "job-prompt-surrogate": ['{"prompt": "a cat \\udcff", "model": "tiny-sd15"}'],
    "job-guidance-infinity": ['{"prompt": "a cat", "guidance": Infinity}'],
    "job-guidance-nan": ['{"prompt": "a cat", "guidance": NaN}'],
    "job-steps-true": [_job(steps=True)],
    "job-steps-float": [_job(steps=2.5)],
    "job-width-not-multiple": [_job(width=100)],
    "job-seeds-duplicate": [_job(seeds=[1, 1])],
    "job-seeds-empty": [_job(seeds=[])],
    "job-seeds-bool": [_job(seeds=[True])],
    "job-seeds-negative": [_job(seeds=[-1])],
    "job-seeds-2^70": [_job(seeds=[2**70])],
    "job-seeds-2^32": [_job(seeds=[2**32])],
    "job-method-unknown": [_job(method="nosuch")],
    "job-option-unknown": [_job(method="agent", options={"nonsense": 1})],
    "job-option-out-of-range": [_job(method="agent", options={"ratio": 5})],
    "job-sweep-empty": [_job(method="agent", sweep={"ratio": []})],
    "job-sweep-unknown-option": [_job(method="agent", sweep={"nonsense": [1, 2]})],
    "job-sweep-bad-value": [_job(method="agent", sweep={"ratio": [0.5, 7]})],
    "job-prompts-without-multi-prompt-method": [_job(prompt=["a cat", "a dog"])],
    "job-input-for-plain": [_job(references=[REF])],
    "job-references-not-a-list": [_job(method="freecustom", references=5)],
    "job-reference-missing": [_job(method="freecustom", prompt="a circle", references=[{"image": "missing.png"}])],
    "job-reference-text-png": [_job(method="freecustom", prompt="a circle", references=[{**REF, "image": "{text}"}])],
    "job-reference-unknown-field": [_job(method="freecustom", prompt="a circle", references=[{**REF, "imgae": 1}])],
    "job-mask-wrong-size": [_job(method="freecustom", prompt="a circle", references=[{**REF, "mask": "{mask32}"}])],
    "job-subject-word-absent": [_job(method="irdiffusion", prompt="a star", subjects=[
        {"word": "moon", "prompt": "a moon", "region": [0, 0, 0.5, 1]}])],
    "job-subject-region-inverted": [_job(method="irdiffusion", prompt="a star", subjects=[
        {"word": "star", "prompt": "a star", "region": [0.5, 0, 0.1, 1]}])],
    "job-lora-text-file": [_job(method="clora", prompt="a square", loras=[
        {"path": "{notlora}", "words": "sks square", "prompt": "a sks square"}])],
    "job-lora-nan": [_job(method="clora", prompt="a square", loras=[
        {"path": "{nan}", "words": "sks square", "prompt": "a sks square"}])],
    "job-composition-inverted-box": [_job(method="primecomposer", prompt="a circle", composition={
        "background": "{img}", "object": "{img}", "box": [40, 40, -20, -20]})],
    "job-composition-outside": [_job(method="primecomposer", prompt="a circle", composition={
        "background": "{img}", "object": "{img}", "box": [100, 100, 10, 10]})],
    "job-composition-mask-size": [_job(method="primecomposer", prompt="a circle", composition={
        "background": "{img}", "object": "{img}", "mask": "{mask32}", "box": [0, 0, 10, 10]})],
    "job-legacy-and-new-composition": [_job(method="primecomposer", prompt="a circle", background="{img}",
                                            composition={"background": "{img}", "object": "{img}", "box": [0, 0, 9, 9]})],
    "job-one-good-one-bad": [_job(), _job(steps=0)],
}
BATCH_ARGS = {
    "job-file-missing": (None, ["{folder}/none.jsonl"]),
    "job-file-not-utf8": (b"\xff\xfe{", []),
    "job-file-empty": (b"", []),
    "job-file-only-comments": (b"# nothing\n\n", []),
    "seeds-flag-only-commas": ([_job()], ["--seeds", ",,,"]),
    "seeds-flag-not-numbers": ([_job()], ["--seeds", "a,b"]),
    "seeds-flag-duplicate": ([_job()], ["--seeds", "3,3"]),
    "seeds-flag-negative": ([_job()], ["--seeds", "-5"]),
    "resume-and-overwrite": ([_job()], ["--resume", "--overwrite"]),
    "device-banana": ([_job()], ["--device", "banana"]),
    "dtype-unknown": ([_job()], ["--dtype", "int4"]),
    "offload-unknown": ([_job()], ["--offload", "half"]),
    "attention-backend-unknown": ([_job()], ["--attention-backend", "fast"]),
    "run-config-unknown-key": ([_job()], ["--config", "{folder}/run.yaml"]),
}


def _fill(value, files: Path):
    paths = {p.stem: str(p) for p in files.iterdir()}
    paths.update(folder=str(files / "folder"))
    if isinstance(value, str):
        return value.format(**paths) if "{" in value and not value.lstrip().startswith(("{\"", "[")) else value
    if isinstance(value, dict):
        return {k: _fill(v, files) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, files) for v in value]
    return value


def _check(result, out: Path, capfd) -> None:
    leaked = capfd.readouterr()  # what libraries logged to the real stdout/stderr (a log flood) instead of one line
    assert not (leaked.out + leaked.err).strip(), leaked.out + leaked.err
    text = result.output
    errors = [line for line in text.splitlines() if line.startswith("Error:")]
    assert result.exit_code not in (0, None), text
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in text, text
    assert len(errors) == 1, text
    assert len(errors[0]) > len("Error: ") + 10, text
    assert not out.exists() or not any(out.iterdir()), sorted(p.name for p in out.iterdir())


@pytest.mark.parametrize("case", sorted(GENERATE))
def test_generate_refuses(case, files, tmp_path, monkeypatch, capfd):
    if case.startswith("device-cuda") and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    args = [_fill(a, files) for a in GENERATE[case]]
    if "-o" not in args:
        args += ["-o", str(out)]
    capfd.readouterr()
    result = CliRunner().invoke(cli, ["generate", *args])
    _check(result, out, capfd)


def _write_jobs(path: Path, jobs) -> None:
    if isinstance(jobs, bytes):
        path.write_bytes(jobs)
        return
    path.write_text("\n".join(j if isinstance(j, str) else json.dumps(j) for j in jobs) + "\n", encoding="utf-8")


@pytest.mark.parametrize("dry_run", [False, True], ids=["run", "dry-run"])
@pytest.mark.parametrize("case", sorted(BATCH) + sorted(BATCH_ARGS))
def test_batch_refuses(case, dry_run, files, tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    (files / "folder" / "run.yaml").write_text("defaults: {}\nsedes: [1]\n")
    jobs_file = tmp_path / "jobs.jsonl"
    if case in BATCH:
        jobs, extra = _fill(BATCH[case], files), []
    else:
        jobs, extra = BATCH_ARGS[case]
        jobs, extra = _fill(jobs, files) if not isinstance(jobs, bytes) else jobs, [_fill(a, files) for a in extra]
    if jobs is not None:
        _write_jobs(jobs_file, jobs)
    target = extra.pop(0) if extra and extra[0].endswith(".jsonl") else str(jobs_file)
    out = tmp_path / "out"
    capfd.readouterr()
    result = CliRunner().invoke(cli, ["batch", target, "-o", str(out), *extra, *(["--dry-run"] if dry_run else [])])
    _check(result, out, capfd)


def test_the_corpus_is_large():
    assert len(GENERATE) + len(BATCH) + len(BATCH_ARGS) >= 80
